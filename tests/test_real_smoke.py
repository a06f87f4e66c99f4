"""configs/real-derain.json, the committed config of the real-parts table, run end to end at a smoke scale: the
official PReNet teacher, the real Rain100L split, the real web photos and the shipped weather LDM, every row
(Teacher, Data, M0, Procedural, DFSR, DFMC, M1-M5, D4IR) trained for a few steps and scored on the first two test
pairs. It proves that the committed config runs on this code; the numbers of the full run are in
docs/benchmarks.md. Skipped without ../shared (the data and the published weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from d4ir.pipelines.experiments import run_experiments
from d4ir.pipelines.experiments.config_parse import parse_config
from d4ir.pipelines.experiments.tables import TABLES
from d4ir.shards.layout import DONE_FILE, ExperimentLayout

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHARED = Path(__file__).resolve().parents[2] / "shared"
TEACHER = SHARED / "weights" / "PReNet" / "logs" / "Rain100L" / "PReNet6" / "net_latest.pth"
needs_shared = pytest.mark.skipif(
    not (SHARED / "data" / "rain100l_test").is_dir() or not TEACHER.is_file(),
    reason=f"the real Rain100L pairs, web photos and the official PReNet weights are not here ({SHARED})")

# Every stage shrunk to a few steps; what the rows read, the teacher and the generator stay the committed ones.
SMOKE_SCALE = {
    "preset": "demo",
    "prompts": {"steps": 2, "batch_size": 4, "crop": 32, "moco": {"queue_size": 8}, "embed_side": 32,
                "checkpoint_every": 1},
    "synth": {"num_samples": 8, "shard_size": 4, "batch_size": 4, "ccd": {"steps": 2, "strength": 0.5, "size": 64}},
    "distill": {"epochs": 2, "joint_epochs": 1, "round_every": 1, "iters_per_epoch": 2, "batch_size": 2, "crop": 32,
                "feedback_batch": 1, "datafree": {"student_steps_per_generator_step": 1}},
}


@needs_shared
def test_the_committed_real_derain_config_runs_every_row(tmp_path):
    spec = json.loads((CONFIGS / "real-derain.json").read_text())
    spec |= {"scale": SMOKE_SCALE, "eval_limit": 2}  # everything else exactly as committed
    config = parse_config(spec, CONFIGS, tmp_path / "exp")
    assert config.tasks["derain"].teacher.checkpoint == TEACHER.resolve()
    run_experiments(config, progress=False)

    rows = TABLES["real"].rows
    scores = {}
    for row in rows:
        marker = ExperimentLayout(tmp_path / "exp").row("derain", "main", row) / DONE_FILE
        assert marker.is_file(), f"row {row} did not finish"
        ev = json.loads(Path(json.loads(marker.read_text())["evals"]["Rain100L 51-100"]["eval"]).read_text())
        assert ev["count"] == 2 and ev["pairs"].endswith("test")
        scores[row] = ev["mean"]["authors_psnr_y"]
    # the published teacher restores the real test pairs (37.5 dB on all 100; far above any few-step student)
    assert scores["Teacher"] > 33 and all(scores[r] < scores["Teacher"] for r in rows if r != "Teacher")
    report = (tmp_path / "exp" / "report.md").read_text()
    assert "Smoke scale" in report and all(f"| {row} " in report or f"{row}" in report for row in rows)
    assert "Procedural" in report and "not in the paper" in report
