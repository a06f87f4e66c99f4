"""What a run folder holds, stage by stage: `d4ir status` and the Makefile's prerequisites read it.

A stage counts as done when its hand-over file exists, written last by the stage (RUN/teacher/teacher.safetensors,
RUN/prompts/embeddings.safetensors, round 0's manifest marked complete, RUN/students/NAME/student.safetensors).
That says the stage ran, not that it ran for as long as a later call would ask: running the stage's own command
with --resume continues it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .layout import EMBEDDINGS_FILE, EVAL_FILE, LOG_FILE, RunLayout, rounds_in
from .writer import read_manifest

STAGES = ("teacher", "prompts", "synth")


@dataclass(frozen=True)
class StageStatus:
    """One line of `d4ir status`.

    Args:
        stage: "teacher", "prompts", "synth" or "student NAME".
        done: the stage's hand-over file exists (for synth: round 0 is complete).
        detail: what was found, for people to read.
    """

    stage: str
    done: bool
    detail: str


def _log_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except OSError:
        return 0


def _round_detail(layout: RunLayout) -> tuple[bool, str]:
    """(round 0 complete, a description of every round of the shared shards root)."""
    done, found = False, []
    for n in rounds_in(layout.shards):
        try:
            manifest = read_manifest(layout.round_shards(n))
        except (OSError, ValueError):
            found.append(f"round {n}: unreadable manifest")
            continue
        done = done or (n == 0 and manifest.complete)
        images = "?" if manifest.images is None else manifest.images
        found.append(f"round {n}: {'complete' if manifest.complete else 'incomplete'}, {images} images")
    return done, "; ".join(found) or "no round"


def run_status(root: str | Path) -> list[StageStatus]:
    """The stages of run folder `root` in order, then one line per student."""
    layout = RunLayout(Path(root))
    out = []
    epochs = _log_lines(layout.teacher_dir / LOG_FILE)
    out.append(StageStatus("teacher", layout.teacher_weights.is_file(),
                           f"{epochs} epochs logged" if layout.teacher_weights.is_file() else "none trained here"))
    embeddings = layout.prompts / EMBEDDINGS_FILE
    out.append(StageStatus("prompts", embeddings.is_file(),
                           f"{_log_lines(layout.prompts / LOG_FILE)} steps logged" if embeddings.is_file() else
                           "no embeddings"))
    out.append(StageStatus("synth", *_round_detail(layout)))
    if layout.students.is_dir():
        for folder in sorted(p for p in layout.students.iterdir() if p.is_dir()):
            weights = layout.student_weights(folder.name).is_file()
            evaluated = (folder / EVAL_FILE).is_file()
            detail = f"{_log_lines(folder / LOG_FILE)} epochs logged" + (", evaluated" if evaluated else "")
            out.append(StageStatus(f"student {folder.name}", weights, detail))
    return out


def stage_done(root: str | Path, stage: str) -> bool:
    """Whether stage `stage` (one of STAGES) of run folder `root` has written its hand-over file."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    return next(s for s in run_status(root) if s.stage == stage).done
