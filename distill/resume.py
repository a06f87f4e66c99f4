"""What a stage-3 run must match to resume or to use the rounds it finds, and older states in this version's form.

A resumed run compares its settings with the state's (`run_settings`: the teacher by content, never by path); a
fresh run that will regenerate refuses rounds an earlier run left (`check_own_rounds`); `upgrade_state` reads what an
older d4ir wrote (a teacher named by path, the adversarial source under 'generator').
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from d4ir.shards.io import sha256_file
from d4ir.shards.layout import STATE_FILE, RunLayout, parse_round
from d4ir.shards.state import StateError
from d4ir.shards.writer import read_manifest

from .config import DistillConfig
from .families import settings_without_encoder_first
from .teachers import TeacherInfo, spec_file


def check_own_rounds(layout: RunLayout, name: str, config: DistillConfig) -> None:
    """A fresh run that will regenerate refuses a student folder holding rounds of an earlier run of that name.

    They were made with the earlier run's prompt encoder, so this run's regeneration would find them unlike its
    own plan and fail after a whole epoch (`shards ... do not match this run ... encoder_sha256`). With a
    state.pt there the epoch loop decides instead (resume it, or refuse and name --resume).
    """
    if (layout.student(name) / STATE_FILE).exists():
        return
    if not config.regenerates:
        return
    root = layout.shards_root(name)
    left = sorted(p.name for p in root.iterdir() if parse_round(p.name) is not None and any(p.iterdir())) \
        if root.is_dir() else []
    if not left:
        return
    # the manifest names the prompts a round was made with, and so the student that made it (a copied round)
    owners = {r: RunLayout.prompts_owner(_prompts_dir_of(root / r)) or name for r in left}
    foreign = {r: o for r, o in owners.items() if o != name}
    if foreign:
        made = ", ".join(f"{r} made by student {o!r}" for r, o in foreign.items())
        raise StateError(f"{root} holds {made} (copied here?), not by a run of {name!r}: this fresh run cannot "
                         f"use them; use another --name, or remove {root}")
    raise StateError(f"{root} holds {', '.join(left)} of an earlier run of student {name!r}, made with another "
                     f"prompt encoder than this fresh run's: continue that run with --resume (it needs its "
                     f"{STATE_FILE}), use another --name, or remove {root}")


def teacher_settings(t_info: TeacherInfo) -> dict:
    """What a resumed run must match of its teacher: its content (the file's sha256, a factory's weights'), and a
    foreign teacher's kind and factory name; never its path, so that a moved or copied run folder resumes."""
    ident = t_info.identity
    if ident is None:  # a registry network: its checkpoint file (ours may be named by its stem or its .json)
        path = spec_file(t_info.spec)
        return {"teacher_sha256": sha256_file(path if path.is_file() else path.with_suffix(".safetensors"))}
    return {"teacher_sha256": ident["sha256"], "teacher_kind": ident["kind"],
            **({"teacher_factory": ident["factory"]} if "factory" in ident else {})}


def run_settings(config: DistillConfig, name: str, t_info: TeacherInfo, teacher_key: str | None,
                 teacher_arch: str | None = None) -> dict:
    """What a resumed run must match: the config but its epoch count (a resumed run may train longer: the schedule
    does not depend on it), the student's name, and the teacher by content, not by path (a moved or copied run
    folder, its default teacher inside, resumes; a foreign teacher adds its kind and factory; config.json names
    where it was)."""
    settings = settings_without_encoder_first(asdict(config), "student_kwargs")
    settings |= {"name": name, **teacher_settings(t_info)}
    if teacher_key is not None:
        settings["teacher_key"] = teacher_key
    if teacher_arch is not None:  # the file is the same, the network is not (GCANet's output rule)
        settings["teacher_arch"] = teacher_arch
    settings.pop("epochs")
    return settings


def _teacher_by_hash(old: dict) -> dict:
    """A state written before the teacher was recorded by content named it by path: its hash, if still there."""
    if "teacher" not in old or "teacher_sha256" in old:
        return old
    path = Path(str(old["teacher"]))
    return {k: v for k, v in old.items() if k != "teacher"} | {
        "teacher_sha256": sha256_file(path) if path.is_file() else f"{path} (missing)"}


def upgrade_state(state: dict) -> dict:
    """A state an older d4ir wrote, in this version's form: a teacher it named by path is known by hash
    (`_teacher_by_hash`), an AirNet student's encoder_first is left out (derived from n_feats), and the DFSR/DFMC source
    it saved under objects 'generator' is under 'adversarial' (distill/datafree.py's generator is the GAN's, one
    part of that source)."""
    objects = dict(state["objects"])
    if "generator" in objects and "adversarial" not in objects:
        objects["adversarial"] = objects.pop("generator")
    settings = settings_without_encoder_first(_teacher_by_hash(state["settings"]), "student_kwargs")
    return state | {"settings": settings, "objects": objects}


def _prompts_dir_of(folder: Path) -> str | None:
    """The prompts a round was made with, as its manifest records them; None for an unreadable manifest."""
    try:
        return read_manifest(folder).prompts_dir
    except (OSError, ValueError):
        return None
