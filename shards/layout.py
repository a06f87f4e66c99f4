"""Every path and file name of a run, in one place: no other module spells a run path.

A run folder holds what the three stages hand to each other (docs/design.md, "Files between the stages"):

    RUN/teacher/                 teacher.safetensors + .json, train.jsonl, state.pt (a teacher trained here)
    RUN/prompts/                 stage 1: prompt_encoder.safetensors + .json, embeddings.safetensors,
                                 index.jsonl, train.jsonl, state.pt
    RUN/shards/round-000/        stage 2: NNNNNN.tar, NNNNNN.stats.json, manifest.json, sizes.json
    RUN/students/NAME/           stage 3: student.safetensors + .json, prompt_encoder.safetensors + .json
                                 (KD-updated), train.jsonl, state.pt, eval.json, config.json
    RUN/students/NAME/prompts/round-NNN/, RUN/students/NAME/shards/round-NNN/
                                 the regeneration rounds (N >= 1) that student made with its own encoder:
                                 they belong to it and are never confused with another student's
    RUN/report.md, RUN/samples/, RUN/curves.png, RUN/timings.json, RUN/export/ (ONNX files, latency.json)

Every resumable training state is `state.pt` (tensors and plain values only, read with weights_only=True);
every log is `train.jsonl`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# File names inside a stage's folder.
STATE_FILE = "state.pt"
LOG_FILE = "train.jsonl"
EVAL_FILE = "eval.json"
CONFIG_FILE = "config.json"
EMBEDDINGS_FILE = "embeddings.safetensors"
INDEX_FILE = "index.jsonl"
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
LOCK_FILE = "synth.lock"  # held by the one process writing a round
# Stems of weight pairs (`stem.safetensors` + `stem.json`, see shards.io.save_weights).
PROMPT_ENCODER_STEM = "prompt_encoder"
TEACHER_STEM = "teacher"
STUDENT_STEM = "student"

_ROUND_RE = re.compile(r"^round-(\d{3,})$")
_SHARD_RE = re.compile(r"^(\d{6,})\.tar$")
_STATS_RE = re.compile(r"^(\d{6,})\.stats\.json$")


def round_name(n: int) -> str:
    """`round-003` for round 3."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"round must be a non-negative int, got {n!r}")
    return f"round-{n:03d}"


def parse_round(name: str) -> int | None:
    """3 for `round-003`; None for any other name, also `round-0003`: only `round_name`'s spelling is a round's
    folder (the stages look for that one, so a round spelled otherwise would be counted but never read)."""
    m = _ROUND_RE.match(name)
    return int(m.group(1)) if m and round_name(int(m.group(1))) == name else None


def shard_name(index: int) -> str:
    """`000012.tar` for shard 12."""
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return f"{index:06d}.tar"


def stats_name(index: int) -> str:
    """`000012.stats.json`: the completion marker of shard 12."""
    return shard_name(index)[: -len(".tar")] + ".stats.json"


def parse_shard(name: str) -> int | None:
    """12 for `000012.tar`; None for any other name."""
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


def parse_stats(name: str) -> int | None:
    """12 for `000012.stats.json`; None for any other name."""
    m = _STATS_RE.match(name)
    return int(m.group(1)) if m else None


def round_dir(root: str | Path, n: int) -> Path:
    """`root/round-NNN`: a round's folder under a prompts or shards root."""
    return Path(root) / round_name(n)


def rounds_in(root: str | Path) -> list[int]:
    """The round numbers under `root` that have a manifest (their synthesis started), sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [parse_round(p.name) for p in root.iterdir() if (p / MANIFEST_FILE).is_file()]
    return sorted(n for n in found if n is not None)


def weights_file(path: str | Path, stem: str) -> Path:
    """The `.safetensors` file a user meant by `path`: a folder holding `stem.safetensors`, a stem, or the
    `.safetensors`/`.json` file itself."""
    path = Path(path)
    if path.is_dir():
        return path / f"{stem}.safetensors"
    return path.with_suffix(".safetensors") if path.suffix in {".json", ""} else path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run folder.

    Args:
        root: the run folder (created lazily by the stages that write into it).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ---- teacher (trained here) and stage 1
    @property
    def teacher_dir(self) -> Path:
        return self.root / "teacher"

    @property
    def teacher_weights(self) -> Path:
        """The teacher trained by `d4ir teacher` into this run (RUN/teacher/teacher.safetensors): a file, as
        `student_weights` is; `teacher_dir` and `student(name)` are the folders."""
        return self.teacher_dir / f"{TEACHER_STEM}.safetensors"

    @property
    def prompts(self) -> Path:
        """Stage 1's folder: round 0's prompt encoder and one prompt per web degraded image."""
        return self.root / "prompts"

    # ---- stage 2 and the rounds of stage 3
    @property
    def shards(self) -> Path:
        """The shared shards root (RUN/shards): round 0 and rounds made by `d4ir synth --round N`."""
        return self.root / "shards"

    def shards_root(self, student: str | None = None) -> Path:
        """Where a student's regeneration rounds go (RUN/students/NAME/shards); the shared root for None."""
        return self.shards if student is None else self.student(student) / "shards"

    def prompts_root(self, student: str) -> Path:
        """Where a student's regenerated prompts go, one round-NNN folder per round."""
        return self.student(student) / "prompts"

    @staticmethod
    def prompts_owner(prompts_dir: str | Path | None) -> str | None:
        """The student whose regenerated prompts `prompts_dir` is (.../students/NAME/prompts/round-NNN, as a
        round's manifest records it), or None for any other folder (stage 1's, or none)."""
        parts = Path(prompts_dir).parts if prompts_dir else ()
        owned = len(parts) >= 4 and parts[-4] == "students" and parts[-2] == "prompts"
        return parts[-3] if owned and parse_round(parts[-1]) is not None else None

    def round_shards(self, n: int, student: str | None = None) -> Path:
        return round_dir(self.shards_root(student), n)

    def round_prompts(self, n: int, student: str | None = None) -> Path:
        """Round 0's prompts are stage 1's; round n >= 1 of a student lives under that student."""
        if n == 0 and student is None:
            return self.prompts
        if student is None:
            raise ValueError(f"round {n} prompts belong to a student: name it")
        return round_dir(self.prompts_root(student), n)

    # ---- stage 3
    @property
    def students(self) -> Path:
        return self.root / "students"

    def student(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"student name must be a plain folder name, got {name!r}")
        return self.students / name

    def student_weights(self, name: str) -> Path:
        return self.student(name) / f"{STUDENT_STEM}.safetensors"

    # ---- the report
    @property
    def input_scores(self) -> Path:
        """The degraded input scored as if it were a model's output (the report's Input row)."""
        return self.root / "input"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def export(self) -> Path:
        """ONNX files of the teacher and the student and their onnxruntime latencies (`make demo`)."""
        return self.root / "export"


DONE_FILE = "done.json"  # an experiments row's marker, written last


@dataclass(frozen=True)
class ExperimentLayout:
    """The folders of `d4ir experiments` under its OUT folder (pipelines/experiments):

        OUT/data/NAME/                  a dataset a `prepare` builder made (data.json: its sources, counts)
        OUT/TASK/                       the task's run (a RunLayout: prompts, shards, students, ...)
        OUT/TASK/inputs/NAME/           folders the stages read, mixed or linked from the config's ones
        OUT/TASK/steps/STEP.json        a shared step's marker (settings, seconds)
        OUT/TASK/teachers/NAME-teacher/ a teacher trained here
        OUT/TASK/rows/TEACHER/ROW/      a row: done.json, and TEST/eval.json per test set
        OUT/TASK/ablations/ROW/         Table 3's rounds (M1-M5)
        OUT/report.md, OUT/samples/, OUT/figures/
    """

    out: Path

    def data(self, name: str) -> Path:
        return self.out / "data" / name

    def task(self, task: str) -> Path:
        return self.out / task

    def run(self, task: str) -> RunLayout:
        return RunLayout(self.task(task))

    def inputs(self, task: str, name: str) -> Path:
        return self.task(task) / "inputs" / name

    def step_marker(self, task: str, step: str) -> Path:
        return self.task(task) / "steps" / f"{step}.json"

    def teacher(self, task: str, name: str) -> Path:
        return self.task(task) / "teachers" / f"{name}-teacher"

    def row(self, task: str, teacher: str, row: str) -> Path:
        return self.task(task) / "rows" / teacher / row

    def ablation(self, task: str, row: str) -> Path:
        return self.task(task) / "ablations" / row

    def markers(self, task: str) -> list[Path]:
        """Every step's and row's marker of a task (unordered)."""
        root = self.task(task)
        return [*(root / "steps").glob("*.json"), *(root / "rows").glob(f"*/*/{DONE_FILE}")]

    @property
    def datasets(self) -> list[Path]:
        """The data.json of every prepared dataset."""
        return sorted((self.out / "data").glob("*/data.json"))

    @property
    def report(self) -> Path:
        return self.out / "report.md"

    @property
    def samples(self) -> Path:
        return self.out / "samples"

    @property
    def figures(self) -> Path:
        return self.out / "figures"
