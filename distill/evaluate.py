"""Scoring a model (or the degraded inputs themselves) on a paired set: eval.json and a paper-shaped table.

Metrics, two conventions side by side, per image and mean:
- ours ("psnr", "ssim", "psnr_y", "ssim_y"): the float output clamped to [0,1], RGB and Y (BT.601), data
  range 1, no border crop by default;
- the authors' ("authors_psnr_y", "authors_ssim_y"): the output quantised as the family's official test
  script saves it (`Family.quantize`: PReNet truncates uint8(255*x), the others round), Y of MATLAB
  rgb2ycbcr unrounded, PSNR peak 1, SSIM as Wang's ssim.m on Y*255 (`metrics.authors_scores`).
eval.json's "conventions" names each column's convention and "authors_quantize" the quantisation used.
The model runs with its official size policy (`distill.inference.restore`), on images above 1 Mpx in
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
from .families import FAMILIES, family_key_of
from .inference import auto_tile, restore
from .metrics import authors_scores, psnr, ssim
from .registry import count_parameters
from .teachers import load_teacher, teacher_record

AUTHORS_METRICS = ("authors_psnr_y", "authors_ssim_y")
OURS = "float output clamped to [0,1], peak 1, SSIM 11x11 Gaussian per channel"
CONVENTIONS = {
    "psnr": f"ours: RGB, {OURS}", "ssim": f"ours: RGB, {OURS}",
    "psnr_y": f"ours: Y (BT.601, unrounded), {OURS}", "ssim_y": f"ours: Y (BT.601, unrounded), {OURS}",
    "authors_psnr_y": "authors: output saved as uint8 ({q}), Y of MATLAB rgb2ycbcr unrounded, PSNR peak 1",
    "authors_ssim_y": "authors: output saved as uint8 ({q}), SSIM as Wang's ssim.m on Y*255 (L=255, valid)",
}


def quantize_of(model: nn.Module | None) -> str:
    """How the model's official test script quantises its output ("round" for foreign modules and inputs)."""
    key = family_key_of(model) if model is not None else None
    return FAMILIES[key].quantize if key else "round"


def conventions(quantize: str) -> dict[str, str]:
    """Each metric column's convention, in words (stored in eval.json, printed by `d4ir eval`)."""
    return {k: v.format(q="truncated" if quantize == "truncate" else "rounded") for k, v in CONVENTIONS.items()}


def convention_note(quantize: str) -> str:
    """One line naming the convention of each row `d4ir eval` prints."""
    how = "truncated" if quantize == "truncate" else "rounded"
    return (f"conventions: RGB and Y: ours ({OURS}); Y (authors): the output saved as uint8 ({how}), Y of "
            "MATLAB rgb2ycbcr unrounded, PSNR peak 1, SSIM as Wang's ssim.m on Y*255")


def _crop(img: torch.Tensor, border: int) -> torch.Tensor:
    return img[..., border:-border, border:-border] if border else img


def _scores(out: torch.Tensor, target: torch.Tensor, border: int, quantize: str) -> dict[str, float]:
    authors = authors_scores(_crop(out, border), _crop(target, border), quantize)
    return {
        "psnr": float(psnr(out, target, crop_border=border)[0]),
        "ssim": float(ssim(out, target, crop_border=border)[0]),
        "psnr_y": float(psnr(out, target, y_channel=True, crop_border=border)[0]),
        "ssim_y": float(ssim(out, target, y_channel=True, crop_border=border)[0]),
        "authors_psnr_y": float(authors["psnr_y"][0]),
        "authors_ssim_y": float(authors["ssim_y"][0]),
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

    Returns {"images": [{name, psnr, ssim, psnr_y, ssim_y, authors_psnr_y, authors_ssim_y, [ref_*]}...],
    "mean": {...}, "params", "seconds_per_image", "device", "count", "skipped": [[name, reason], ...],
    "cropped": [[name, sizes], ...] (pairs whose sizes differed by up to 64 px, scored on their centre crops),
    "authors_quantize", "conventions": {metric: its convention in words}}.
    """
    from d4ir.shards.progress import progress_bar

    if not isinstance(pairs, PairSet):
        kept = list(pairs)[:limit] if limit else list(pairs)
        if not kept:
            raise ValueError("no pairs to evaluate")
        # find_pairs' skipped pairs (and folder) go along, to be counted in the result
        pairs = load_pairs(PairList(kept, getattr(pairs, "skipped", []), getattr(pairs, "root", None)))
    items = pairs.items[:limit] if limit else pairs.items
    quantize = quantize_of(model)
    rows, seconds = [], 0.0
    for name, deg, cln in progress_bar(items, desc="eval", enabled=progress, leave=False):
        degraded, clean = to_tensor(deg)[None].to(device), to_tensor(cln)[None].to(device)
        tiles = auto_tile(*deg.shape[:2], tile)  # large images in tiles: memory bounded by the tile
        t0 = time.perf_counter()
        out = degraded if model is None else restore(model, degraded, tile=tiles)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        row = {"name": name, **_scores(out, _fit(clean, out), border, quantize)}
        if reference is not None:
            ref = restore(reference, degraded, tile=tiles)
            row.update({f"ref_{k}": v for k, v in _scores(out, _fit(ref, out), border, quantize).items()})
        rows.append(row)
    keys = [k for k in rows[0] if k != "name"]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"images": rows, "mean": mean, "params": count_parameters(model) if model is not None else 0,
            "seconds_per_image": seconds / len(rows), "device": device, "count": len(rows),
            "skipped": [list(s) for s in pairs.skipped], "cropped": [list(c) for c in pairs.cropped],
            "authors_quantize": quantize, "conventions": conventions(quantize)}


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


def metric_keys(y_channel: bool = False, authors: bool = False) -> tuple[str, str]:
    """The (PSNR, SSIM) keys of a convention: ours on RGB or Y, or the authors' (always Y)."""
    if authors:
        return AUTHORS_METRICS
    return ("psnr_y", "ssim_y") if y_channel else ("psnr", "ssim")


def format_table(rows: Sequence[tuple[str, str, dict]], y_channel: bool = False, authors: bool = False) -> str:
    """A table shaped like the paper's: Type | Method | Params (M) | PSNR (dB) | SSIM (rows: type, method,
    eval result); `authors` scores in the authors' convention (a result without it shows '-')."""
    p, s = metric_keys(y_channel, authors)
    lines = ["| Type | Method | Params (M) | PSNR (dB) | SSIM |", "|---|---|---|---|---|"]
    for kind, method, r in rows:
        params = f"{r['params'] / 1e6:.2f}" if r.get("params") else "-"
        m = r["mean"]
        cells = (f"{m[p]:.2f}", f"{m[s]:.3f}") if p in m else ("-", "-")
        lines.append(f"| {kind} | {method} | {params} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


AUTHORS_CAPTION = ("Y in the authors' convention (the output saved as uint8 as the official test script does, "
                   "Y of MATLAB rgb2ycbcr unrounded, PSNR peak 1, SSIM as Wang's ssim.m on Y*255):")


def authors_table(rows: Sequence[tuple[str, str, dict | None]]) -> str | None:
    """Type | Method | PSNR Y (authors) | SSIM Y (authors) for (type, method, eval result or None) rows; None
    when no result holds the authors' metrics (eval.json files written before them). The quantisation of each
    row is named in its cell when it is not rounding."""
    if not any(r and AUTHORS_METRICS[0] in r.get("mean", {}) for _, _, r in rows):
        return None
    lines = ["| Type | Method | PSNR Y (dB, authors') | SSIM Y (authors') | uint8 quantisation |",
             "|---|---|---|---|---|"]
    for kind, method, r in rows:
        m = (r or {}).get("mean", {})
        if AUTHORS_METRICS[0] in m:
            cells = f"{m[AUTHORS_METRICS[0]]:.2f} | {m[AUTHORS_METRICS[1]]:.3f} | {r.get('authors_quantize', '-')}"
        else:
            cells = "- | - | -"
        lines.append(f"| {kind} | {method} | {cells} |")
    return "\n".join(lines)
