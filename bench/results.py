"""Where a benchmark's results go: one JSON file, written whole (a temporary file, then a rename)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path | None, data: dict) -> None:
    """Write `data` to `path` (parents created; nothing when `path` is None), atomically, so that a killed run
    leaves the last whole file; values JSON cannot hold are written as their str()."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
