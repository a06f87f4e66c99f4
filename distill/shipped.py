"""The teachers that ship inside the package (distill/weights/NAME/teacher.safetensors + teacher.json, each
with its model card README.md and training.json), named in an experiments config as `shipped:NAME`.

demo-derain: the demo's deraining PRN, trained by bench/train_demo_teacher.py on the demo's original split.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from d4ir.shards.errors import UnknownNameError

SHIPPED_PREFIX = "shipped:"


def shipped_teachers() -> dict[str, Path]:
    """{name: teacher.safetensors} of every teacher shipped with d4ir."""
    folder = Path(str(resources.files("d4ir.distill") / "weights"))
    found = sorted(folder.glob("*/teacher.safetensors")) if folder.is_dir() else []
    return {p.parent.name: p for p in found}


def shipped_teacher(name: str) -> Path:
    """The checkpoint of the shipped teacher `name` (`shipped:NAME` in a config: the prefix is dropped)."""
    name = name.removeprefix(SHIPPED_PREFIX)
    shipped = shipped_teachers()
    if name not in shipped:
        raise UnknownNameError(f"no shipped teacher {name!r}; shipped: {', '.join(shipped) or 'none'}")
    return shipped[name]
