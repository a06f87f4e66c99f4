"""pipelines.demo_export: the demo's teacher and student exported, timed by onnxruntime, and reported."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from d4ir.distill.export import onnx_latency_ms  # noqa: E402
from d4ir.distill.registry import build, count_parameters, save_model  # noqa: E402
from d4ir.pipelines.demo_export import LATENCY_FILE, export_and_time, latency_lines  # noqa: E402
from d4ir.shards.layout import RunLayout  # noqa: E402

WIDE = dict(n_feats=16, n_groups=1, n_blocks=1, queue_size=4)
HALF = dict(n_feats=8, n_groups=1, n_blocks=1, queue_size=4)


def _checkpoints(tmp_path):
    torch.manual_seed(0)
    teacher = save_model(tmp_path / "t" / "teacher", build("airnet", **WIDE), "airnet")
    student = save_model(tmp_path / "s" / "student", build("airnet", **HALF), "half-airnet")
    return teacher, student


def test_export_and_time_writes_checked_files_and_the_ratio(tmp_path):
    teacher, student = _checkpoints(tmp_path)
    layout = RunLayout(tmp_path / "run")
    out = export_and_time(layout, {"teacher": teacher, "student": student}, size=32, reps=2)
    assert (layout.export / "teacher.onnx").is_file() and (layout.export / "student.onnx").is_file()
    on_disk = json.loads((layout.export / LATENCY_FILE).read_text())
    assert on_disk == json.loads(json.dumps(out))
    t, s = out["models"]["teacher"], out["models"]["student"]
    assert len(t["latencies_ms"]) == 2 and all(v > 0 for v in t["latencies_ms"])
    assert t["max_diff"] <= 1e-4 and s["max_diff"] <= 1e-4
    assert t["params"] == count_parameters(build("airnet", **WIDE))
    ratio = out["student_vs_teacher"]
    assert ratio["params"] == pytest.approx(s["params"] / t["params"]) and ratio["params"] < 1
    assert ratio["latency"] == pytest.approx(s["median_ms"] / t["median_ms"])
    lines = latency_lines(layout)
    assert any(line.startswith("| student |") for line in lines)
    assert any(f"parameters {ratio['params']:.2f}x" in line for line in lines)


def test_without_the_export_extra_nothing_is_written(tmp_path, monkeypatch):
    teacher, student = _checkpoints(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    layout = RunLayout(tmp_path / "run")
    out = export_and_time(layout, {"teacher": teacher, "student": student}, size=32, reps=1)
    assert "export" in out["skipped"] and not (layout.export / LATENCY_FILE).exists()
    assert latency_lines(layout) == []


def test_latency_rejects_bad_counts(tmp_path):
    _, student = _checkpoints(tmp_path)
    with pytest.raises(ValueError, match="reps >= 1"):
        onnx_latency_ms(student, 32, 32, reps=0)
