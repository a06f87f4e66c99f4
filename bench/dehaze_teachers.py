"""The published GCANet and Light-DehazeNet teachers on the shared benchmark samples: input and output PSNR/SSIM
and seconds per image, as a markdown table (stdout) and JSON (--json-out).

Runs: GCANet dehaze (wacv_gcanet_dehaze.pth, residual output) on sots_indoor_samples, sots_outdoor_samples and
hsts_synthetic; GCANet derain (wacv_gcanet_derain.pth, ReLU output) on test1200_samples; Light-DehazeNet
(trained_LDNet.pth) on the two SOTS sample sets. Pairs are read by `distill.data.load_pairs`, which
center-crops SOTS-indoor's 640x480 ground truth to the 620x460 hazy image (GT[10:470, 10:630], the standard
evaluation crop).

Metrics (distill.metrics): PSNR (peak 1) and SSIM (11x11 Gaussian, sigma 1.5, 'valid', channels averaged) on
RGB in [0,1], no border crop; "out" scores the float output clamped to [0,1], "out 8-bit" the output rounded to
256 levels and clamped (`distill.gcanet.official_quantize`: GCANet's test script; Light-DehazeNet's
torchvision save_image rounds the same way). Seconds: wall time of the forward pass (distill.inference.restore,
no_grad) per image, on --device with --threads.

These sets hold 3 to 10 images (SOTS-indoor 3 of 500, SOTS-outdoor 10 of 500, HSTS 10 of 10, Test1200 3 of
1200): their means cannot reproduce a published mean (GCANet: SOTS-indoor 30.23 dB / 0.980, DID-MDN test
31.68 dB).

  python bench/dehaze_teachers.py --threads 2 --json-out /tmp/dehaze_teachers.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from results import write_json

_HERE = Path(__file__).resolve().parent
_SHARED = _HERE.parents[1] / "shared"
GCANET_DIR = Path("GCANet/models")
RUNS = [  # (label, weights file under --weights, family, constructor kwargs, sets under --data)
    ("gcanet-dehaze", GCANET_DIR / "wacv_gcanet_dehaze.pth", "gcanet", {"residual": True},
     ["sots_indoor_samples", "sots_outdoor_samples", "hsts_synthetic"]),
    ("gcanet-derain", GCANET_DIR / "wacv_gcanet_derain.pth", "gcanet", {"residual": False}, ["test1200_samples"]),
    ("ldnet", Path("Light-DehazeNet/trained_weights/trained_LDNet.pth"), "ldnet", {},
     ["sots_indoor_samples", "sots_outdoor_samples"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=_SHARED / "data", help="the shared benchmark sets")
    p.add_argument("--weights", type=Path, default=_SHARED / "weights", help="the shared official weights")
    p.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="comma-separated subset of the runs")
    p.add_argument("--limit", type=int, default=None, help="only the first N pairs of each set (smoke tests)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json-out", type=Path, default=None, help="write every measurement here")
    args = p.parse_args(argv)
    known = {r[0] for r in RUNS}
    unknown = [r for r in args.runs.split(",") if r not in known]
    if unknown:
        p.error(f"unknown run(s) {unknown}; known: {sorted(known)}")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def load_teacher(path: Path, family: str, kwargs: dict):
    """The family's model loaded strictly from an official file (weights_only=True, on the CPU)."""
    import torch
    from d4ir.distill import gcanet, ldnet

    module, cls = {"gcanet": (gcanet, gcanet.GCANet), "ldnet": (ldnet, ldnet.LightDehazeNet)}[family]
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not module.detect(state):
        raise ValueError(f"{path} is not a {family} state_dict in the official layout")
    model = cls(**module.kwargs_from_state_dict(state), **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def score_set(model, folder: Path, device: str, limit: int | None) -> dict:
    """Per-image and mean input/output PSNR and SSIM (RGB) and forward seconds of `model` on one paired set."""
    import torch
    from d4ir.distill.data import load_pairs
    from d4ir.distill.gcanet import official_quantize
    from d4ir.distill.inference import restore
    from d4ir.distill.metrics import psnr, ssim
    from d4ir.shards.images import to_tensor

    pairs = load_pairs(folder)
    rows = []
    for name, deg, cln in pairs.items[:limit]:
        x, y = to_tensor(deg)[None].to(device), to_tensor(cln)[None].to(device)
        t0 = time.perf_counter()
        out = restore(model, x, policy="none")  # the models handle any size themselves; clamped to [0,1]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        q = official_quantize(out)
        rows.append({"name": name, "size": f"{x.shape[-1]}x{x.shape[-2]}", "seconds": seconds,
                     "in_psnr": float(psnr(x, y)[0]), "in_ssim": float(ssim(x, y)[0]),
                     "out_psnr": float(psnr(out, y)[0]), "out_ssim": float(ssim(out, y)[0]),
                     "q_psnr": float(psnr(q, y)[0]), "q_ssim": float(ssim(q, y)[0])})
    keys = [k for k in rows[0] if k not in ("name", "size")]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    return {"set": folder.name, "count": len(rows), "skipped": [list(s) for s in pairs.skipped], "images": rows,
            "mean": mean}


def markdown(results: list[dict]) -> str:
    """One row per (teacher, set): means over the set's images."""
    head = ("| teacher | set | images | input PSNR / SSIM | out PSNR / SSIM | out 8-bit PSNR / SSIM | s / image |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        m = r["mean"]
        lines.append(f"| {r['teacher']} | {r['set']} | {r['count']} | {m['in_psnr']:.2f} / {m['in_ssim']:.4f} | "
                     f"{m['out_psnr']:.2f} / {m['out_ssim']:.4f} | {m['q_psnr']:.2f} / {m['q_ssim']:.4f} | "
                     f"{m['seconds']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = args.runs.split(",")
    results = []
    for label, rel, family, kwargs, sets in RUNS:
        if label not in wanted:
            continue
        model = load_teacher(args.weights / rel, family, kwargs).to(args.device)
        for name in sets:
            res = score_set(model, args.data / name, args.device, args.limit)
            results.append({"teacher": label, "weights": str(rel), **res})
            print(f"{label} {name}: {res['mean']['in_psnr']:.2f} -> {res['mean']['q_psnr']:.2f} dB", flush=True)
    table = markdown(results)
    print(table)
    machine = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": args.device}
    write_json(args.json_out, {"command": " ".join(sys.argv), "machine": machine, "results": results,
                               "table": table})
    return results


if __name__ == "__main__":
    main()
