"""bench/prenet.py and bench/published_teachers.py: the measuring functions on a tiny PReNet, and the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from d4ir.distill.prenet import PReNet

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prenet_bench_measures_both_paths_and_the_kd_step():
    bench = _load("prenet")
    torch.manual_seed(0)
    model = PReNet(channels=4, stages=2).eval()
    images = [("a", torch.rand(1, 3, 20, 24)), ("b", torch.rand(1, 3, 18, 22))]
    rows = bench.bench_inference(model, images)
    assert [r["name"] for r in rows] == ["a", "b"] and rows[0]["size"] == "24x20"
    assert all(r["plain_s"] > 0 and r["fast_s"] > 0 and r["max_abs_diff"] < 1e-5 for r in rows)
    assert model.fast  # left on the fast path
    kd = bench.bench_kd_step(model, images, steps=1, batch=2, crop=16)
    assert kd["step_s"] == kd["teacher_s"] + kd["student_s"] and kd["batch"] == 2


def test_published_teachers_table_names_the_gap_and_the_convention():
    bench = _load("published_teachers")
    mean = {"authors_psnr_y": 37.46, "authors_ssim_y": 0.9792, "psnr": 36.08, "ssim": 0.9752, "psnr_y": 37.5,
            "ssim_y": 0.98}
    row = bench.row_of("PReNet6", {"mean": mean, "params": 168963, "count": 100, "seconds_per_image": 2.4}, 240.0)
    assert row["within"] and abs(row["gap_db"] + 0.02) < 1e-9
    far = bench.row_of("PRN6_r", {"mean": {**mean, "authors_psnr_y": 35.0}, "params": 21123, "count": 100,
                                  "seconds_per_image": 0.5}, 50.0)
    text = bench.table([row, far], threads=2)
    assert "| PReNet | 168,963 | 37.46 | 37.48 | -0.02 | 0.9792 | 0.979 |" in text
    assert "-1.11 (outside 0.1)" in text and "2 threads" in text and "ssim.m on Y*255" in text
