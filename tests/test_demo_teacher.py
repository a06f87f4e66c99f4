"""The teacher shipped for the demo (distill/weights/demo-derain): it loads by name, its card records a gain of at
least 3 dB over its input, its half student has at most 0.55x its parameters, and configs/demo.json names it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from d4ir.distill.registry import build, count_parameters, half_of, load_model
from d4ir.distill.shipped import shipped_teacher, shipped_teachers
from d4ir.pipelines.experiments import load_config
from d4ir.pipelines.experiments.shipped import find_config
from d4ir.shards.errors import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_teacher_ships_with_its_card_and_restores():
    path = shipped_teacher("shipped:demo-derain")
    assert path == shipped_teacher("demo-derain") and set(shipped_teachers()) >= {"demo-derain"}
    net, info = load_model(path)
    record = json.loads((path.parent / "training.json").read_text())
    assert record["params"] == count_parameters(net) and record["test"]["gain_db"] >= 3.0
    arch, half = half_of(info)
    assert count_parameters(build(arch, **half)) / count_parameters(net) <= 0.55
    card = (path.parent / "README.md").read_text()
    assert "bench/train_demo_teacher.py" in card and f"{record['test']['gain_db']:+.2f} dB" in card
    with pytest.raises(UnknownNameError, match="no shipped teacher 'nope'; shipped: demo-derain"):
        shipped_teacher("nope")


def test_the_demo_config_distils_the_shipped_teacher_on_the_generated_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, shipped = find_config("demo")
    cfg = load_config(path, base=Path.cwd())
    task = cfg.tasks["derain"]
    assert shipped and task.teacher.checkpoint == shipped_teacher("demo-derain") and cfg.export and cfg.threads == 1
    assert cfg.out == tmp_path / "runs" / "demo" and task.original == cfg.out / "data" / "demo" / "derain" / "original"
    assert [t.name for t in cfg.tables] == ["demo"] and cfg.sd == "weather"
