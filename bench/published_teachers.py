"""The four published PReNet teachers on the Rain100L test set, scored as `d4ir eval` scores them, beside the
numbers their paper publishes.

Each of PReNet, PReNet_r, PRN, PRN_r (../shared/weights/PReNet/logs/Rain100L/*/net_latest.pth) runs through
`distill.evaluate.evaluate` (the code path of `d4ir eval --model FILE --pairs ../shared/data/rain100l_test`),
which writes one eval.json per teacher under --out-dir. Printed and written to --out-dir/published.md: the
authors'-convention Y PSNR / SSIM (uint8 by truncation, MATLAB rgb2ycbcr Y, ssim.m on Y*255) and its gap to
the published number, our RGB and Y, seconds per image and the threads. --out-dir/published.json holds it all.
The acceptance of issue 22: PReNet within 0.05 dB / 0.001 of 37.48 / 0.979, the others within 0.1 dB.

Whole set (about 4 x 100 x 2.5 s on a quiet 2-core machine):
    python bench/published_teachers.py --threads 2 --out-dir bench_results/published_teachers
Smoke test: python bench/published_teachers.py --limit 3 --out-dir /tmp/published
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from results import write_json

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# folder under PReNet/logs/Rain100L -> (label, published Y PSNR, published Y SSIM, acceptance tolerance in dB)
PUBLISHED = {
    "PReNet6": ("PReNet", 37.48, 0.979, 0.05),
    "PReNet6_r": ("PReNet_r", 37.10, 0.977, 0.1),
    "PRN6": ("PRN", 36.99, 0.977, 0.1),
    "PRN6_r": ("PRN_r", 36.11, 0.973, 0.1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=SHARED / "weights/PReNet/logs/Rain100L",
                   help="folder holding PReNet6, PReNet6_r, PRN6, PRN6_r")
    p.add_argument("--pairs", type=Path, default=SHARED / "data/rain100l_test")
    p.add_argument("--out-dir", type=Path, default=Path("bench_results/published_teachers"))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--limit", type=int, help="only the first N pairs (a smoke test; not the published mean)")
    p.add_argument("--only", help="comma-separated folders (default: all four)")
    return p.parse_args(argv)


def row_of(folder: str, result: dict, wall: float) -> dict:
    label, pub_psnr, pub_ssim, tol = PUBLISHED[folder]
    m = result["mean"]
    return {"teacher": label, "folder": folder, "params": result["params"], "count": result["count"],
            "authors_psnr_y": m["authors_psnr_y"], "authors_ssim_y": m["authors_ssim_y"],
            "published_psnr_y": pub_psnr, "published_ssim_y": pub_ssim,
            "gap_db": m["authors_psnr_y"] - pub_psnr, "tolerance_db": tol,
            "within": abs(m["authors_psnr_y"] - pub_psnr) <= tol,
            "psnr": m["psnr"], "ssim": m["ssim"], "psnr_y": m["psnr_y"], "ssim_y": m["ssim_y"],
            "seconds_per_image": result["seconds_per_image"], "wall_s": wall}


def table(rows: list[dict], threads: int) -> str:
    lines = [
        f"Rain100L test, {rows[0]['count'] if rows else 0} pairs, {threads} threads, torch {torch.__version__}. "
        "Y (authors): the output saved as uint8 by truncation, Y of MATLAB rgb2ycbcr unrounded, PSNR peak 1, "
        "SSIM as ssim.m on Y*255; RGB, Y (ours): the float output clamped to [0,1].",
        "",
        "| teacher | params | Y PSNR (authors) | published | gap (dB) | Y SSIM (authors) | published | "
        "RGB PSNR / SSIM (ours) | Y PSNR / SSIM (ours) | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['teacher']} | {r['params']:,} | {r['authors_psnr_y']:.2f} | {r['published_psnr_y']:.2f} | "
            f"{r['gap_db']:+.2f}{'' if r['within'] else ' (outside ' + str(r['tolerance_db']) + ')'} | "
            f"{r['authors_ssim_y']:.4f} | {r['published_ssim_y']:.3f} | {r['psnr']:.2f} / {r['ssim']:.4f} | "
            f"{r['psnr_y']:.2f} / {r['ssim_y']:.4f} | {r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from d4ir.distill.evaluate import evaluate

    torch.set_num_threads(args.threads)
    folders = args.only.split(",") if args.only else list(PUBLISHED)
    unknown = [f for f in folders if f not in PUBLISHED]
    if unknown:
        raise SystemExit(f"unknown teachers {unknown}; known: {', '.join(PUBLISHED)}")
    rows = []
    for folder in folders:
        t0 = time.perf_counter()
        result = evaluate(args.weights / folder / "net_latest.pth", args.pairs, args.out_dir / folder / "eval.json",
                          limit=args.limit, progress=False)
        rows.append(row_of(folder, result, time.perf_counter() - t0))
        print(f"{folder}: Y (authors) {rows[-1]['authors_psnr_y']:.2f} dB / {rows[-1]['authors_ssim_y']:.4f}, "
              f"{rows[-1]['seconds_per_image']:.2f} s/image", flush=True)
    text = table(rows, args.threads)
    print(text)
    out = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "pairs": str(args.pairs), "limit": args.limit, "rows": rows}
    write_json(args.out_dir / "published.json", out)
    (args.out_dir / "published.md").write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
