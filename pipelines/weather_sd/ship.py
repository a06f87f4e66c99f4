"""Shipping a trained weather LDM inside the package (synth/weights/weather-ldm, `load_sd("weather")`).

`ship(model_dir, dest, info)` copies the model's files (configs, safetensors, tokenizer) into DEST, rewrites
its model card (README.md, training.json) with `info` (the training record plus the measurements) and writes
DEST/files.json:

    {"fingerprint": sha256 of the loaded model (synth.sd_parts.sd_fingerprint, float32 on the CPU),
     "weights_mb": total safetensors size in MB,
     "files": {relative path: {"bytes": size, "sha256": digest}} for every file but README.md, training.json
              and files.json}

so a test can check that the shipped folder is exactly the model that was measured.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from d4ir.pipelines.weather_sd.folder import weights_mb, write_card

MANIFEST = "files.json"
CARD_FILES = ("README.md", "training.json", MANIFEST)


def file_table(folder: str | Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of the model files under `folder` (the card files excluded)."""
    folder = Path(folder)
    table = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in CARD_FILES:
            continue
        table[rel] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return table


def manifest(folder: str | Path, fingerprint: str) -> dict:
    """The content of files.json for `folder` (see the module docstring)."""
    return {"fingerprint": fingerprint, "weights_mb": round(weights_mb(folder), 3), "files": file_table(folder)}


def ship(model_dir: str | Path, dest: str | Path, info: dict) -> Path:
    """Copy the model at `model_dir` to `dest` (replacing it), with its card and files.json.

    Args:
        model_dir: a folder written by `folder.save_weather_sd`.
        dest: where it goes (synth/weights/weather-ldm).
        info: the model card's content (`folder.model_card`).
    """
    from d4ir.synth.sd import load_sd

    model_dir, dest = Path(model_dir), Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns(*CARD_FILES))
    fingerprint = load_sd(str(tmp)).fingerprint
    write_card(tmp, {**info, "size_mb": round(weights_mb(tmp), 3), "fingerprint": fingerprint})
    (tmp / MANIFEST).write_text(json.dumps(manifest(tmp, fingerprint), indent=1, sort_keys=True) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
