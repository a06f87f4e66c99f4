"""pipelines/experiments/steps.marked: a finished step is reused when its settings are the same in this version's
form, and refused in one line when they really changed."""

from __future__ import annotations

import json

import pytest
from d4ir.pipelines.experiments.steps import marked


def _run(marker, settings, calls):
    return marked(marker, settings, lambda: calls.append(1) or {"model": "m"}, title="step", log=lambda _: None)


def test_a_marker_of_an_older_d4ir_with_encoder_first_is_reused(tmp_path):
    marker = tmp_path / "done.json"
    old = {"config": {"arch": "airnet", "arch_kwargs": {"n_feats": 16, "encoder_first": 16, "n_groups": 2}},
           "rows": [{"student_kwargs": {"n_feats": 8, "encoder_first": 8}}]}
    marker.write_text(json.dumps({"step": "step", "settings": old, "seconds": 1.0, "model": "m"}))
    now = {"config": {"arch": "airnet", "arch_kwargs": {"n_feats": 16, "n_groups": 2}},
           "rows": [{"student_kwargs": {"n_feats": 8}}]}
    calls: list = []
    assert _run(marker, now, calls)["model"] == "m" and not calls  # reused, not rerun


def test_a_really_changed_setting_is_refused(tmp_path):
    marker = tmp_path / "done.json"
    calls: list = []
    _run(marker, {"config": {"arch_kwargs": {"n_feats": 16}}}, calls)
    assert calls == [1] and "encoder_first" not in marker.read_text()
    with pytest.raises(ValueError, match="other settings"):
        _run(marker, {"config": {"arch_kwargs": {"n_feats": 32}}}, calls)
    # an encoder_first that disagrees with n_feats is kept, so it shows as a change (AirNet would refuse it)
    with pytest.raises(ValueError, match="other settings"):
        _run(marker, {"config": {"arch_kwargs": {"n_feats": 16, "encoder_first": 8}}}, calls)
