"""Scoring a model (or the degraded inputs themselves) on a paired set: eval.json and a paper-shaped table.

Metrics: PSNR and SSIM on RGB and on Y (BT.601), data range 1, no border crop by default, per image and
mean. The model runs with its official size policy (`distill.inference.restore`), on images above 1 Mpx in
tiles (`inference.auto_tile`: the model's memory is bounded by the tile); under AirNet's "crop"
policy the clean image is center-cropped the same way, as in AirNet's test.py. With a `reference` model
(the teacher) the same metrics are also computed against the reference's output.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from d4ir.shards.images import to_tensor
from d4ir.shards.io import atomic_write_json
from d4ir.shards.pairs import Pair, PairList
from torch import nn

from .data import PairSet, load_pairs
from .inference import auto_tile, restore
from .metrics import psnr, ssim
from .registry import count_parameters
from .teachers import load_teacher, teacher_record

METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")


def _scores(out: torch.Tensor, target: torch.Tensor, border: int) -> dict[str, float]:
    return {
        "psnr": float(psnr(out, target, crop_border=border)[0]),
        "ssim": float(ssim(out, target, crop_border=border)[0]),
        "psnr_y": float(psnr(out, target, y_channel=True, crop_border=border)[0]),
        "ssim_y": float(ssim(out, target, y_channel=True, crop_border=border)[0]),
    }


def _fit(target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Center-crop target [1,3,H,W] to out's size (AirNet's crop policy returns a cropped output)."""
    h, w = out.shape[-2:]
    top, left = (target.shape[-2] - h) // 2, (target.shape[-1] - w) // 2
    return target[..., top : top + h, left : left + w]


@torch.no_grad()
def evaluate_model(
    model: nn.Module | None, pairs: Sequence[Pair] | PairSet, *, device: str = "cpu",
    reference: nn.Module | None = None, tile: int | None = None, border: int = 0, limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Score `model` (None: the degraded input itself, "identity") on `pairs` (read whole first: bad pairs are
    skipped and listed, see `distill.data.load_pairs`).

    Returns {"images": [{name, psnr, ssim, psnr_y, ssim_y, [ref_*]}...], "mean": {...}, "params",
    "seconds_per_image", "device", "count", "skipped": [[name, reason], ...], "cropped": [[name, sizes], ...]}
    (cropped: pairs whose sizes differed by up to 64 px, scored on their centre crops).
    """
    from d4ir.shards.progress import progress_bar

    if not isinstance(pairs, PairSet):
        kept = list(pairs)[:limit] if limit else list(pairs)
        if not kept:
            raise ValueError("no pairs to evaluate")
        # find_pairs' skipped pairs (and folder) go along, to be counted in the result
        pairs = load_pairs(PairList(kept, getattr(pairs, "skipped", []), getattr(pairs, "root", None)))
    items = pairs.items[:limit] if limit else pairs.items
    rows, seconds = [], 0.0
    for name, deg, cln in progress_bar(items, desc="eval", enabled=progress, leave=False):
        degraded, clean = to_tensor(deg)[None].to(device), to_tensor(cln)[None].to(device)
        tiles = auto_tile(*deg.shape[:2], tile)  # large images in tiles: memory bounded by the tile
        t0 = time.perf_counter()
        out = degraded if model is None else restore(model, degraded, tile=tiles)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        row = {"name": name, **_scores(out, _fit(clean, out), border)}
        if reference is not None:
            ref = restore(reference, degraded, tile=tiles)
            row.update({f"ref_{k}": v for k, v in _scores(out, _fit(ref, out), border).items()})
        rows.append(row)
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"images": rows, "mean": mean, "params": count_parameters(model) if model is not None else 0,
            "seconds_per_image": seconds / len(rows), "device": device, "count": len(rows),
            "skipped": [list(s) for s in pairs.skipped], "cropped": [list(c) for c in pairs.cropped]}


def write_eval(path: Path, result: dict, **info) -> Path:
    """eval.json: the result plus what was evaluated (model path, pairs folder, ...)."""
    atomic_write_json(path, {**info, **result})
    return path


IDENTITY = "identity"  # the model spec that scores the degraded inputs themselves


def evaluate(
    model: str | Path,
    pairs_dir: Path,
    out: Path,
    *,
    reference: str | Path | None = None,
    arch: str | None = None,
    weights_key: str | None = None,
    device: str = "cpu",
    tile: int | None = None,
    border: int = 0,
    limit: int | None = None,
    progress: bool = True,
    **info,
) -> dict:
    """Score a checkpoint (or "identity": the degraded inputs) on a paired set and write eval.json.

    Args:
        model: any network `distill.teachers.load_teacher` reads (our checkpoint, an official .pth, TorchScript,
            .pt2, package.module:callable@weights), or "identity".
        pairs_dir: the paired test set (any layout `shards.pairs` reads).
        out: the eval.json to write.
        reference: a second model (the teacher) also scored against: the ref_* metrics.
        arch: the architecture of an official .pth when it cannot be inferred.
        weights_key: the entry of an official .pth holding the weights (default: params_ema before params).
        tile, border, limit: tiled inference, pixels cropped before scoring, only the first N pairs.
        info: extra fields stored in eval.json (the report's row type, method and order).
    Returns:
        The result written (evaluate_model's dict with model, pairs and reference added).
    """
    if str(model) == IDENTITY:
        net, name = None, IDENTITY
    else:
        net, loaded = load_teacher(model, arch=arch, weights_key=weights_key)
        net, name = net.to(device).eval(), loaded.name
    ref = load_teacher(reference)[0].to(device).eval() if reference else None
    result = evaluate_model(net, load_pairs(pairs_dir), device=device, reference=ref, tile=tile, border=border,
                            limit=limit, progress=progress)
    result |= {"name": name, "model": str(model) if str(model) == IDENTITY else teacher_record(model),
               "pairs": str(pairs_dir), "reference": teacher_record(reference) if reference else ""}
    write_eval(out, result, **info)
    return result


def format_table(rows: Sequence[tuple[str, str, dict]], y_channel: bool = False) -> str:
    """A table shaped like the paper's: Type | Method | Params (M) | PSNR (dB) | SSIM (rows: type, method,
    eval result)."""
    p, s = ("psnr_y", "ssim_y") if y_channel else ("psnr", "ssim")
    lines = ["| Type | Method | Params (M) | PSNR (dB) | SSIM |", "|---|---|---|---|---|"]
    for kind, method, r in rows:
        params = f"{r['params'] / 1e6:.2f}" if r.get("params") else "-"
        lines.append(f"| {kind} | {method} | {params} | {r['mean'][p]:.2f} | {r['mean'][s]:.3f} |")
    return "\n".join(lines)
