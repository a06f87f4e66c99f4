"""bench/gpu_bench.py on the CPU: the smoke run (tiny model, 64x64, T = 10) writes every section with numbers,
the distill section times each deformable-conv implementation when `distill.deform` offers them (a stand-in
module here), a failing section is recorded while the next still runs, and bad arguments are refused."""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    return importlib.import_module("gpu_bench")  # pytest puts bench/ on the path


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    results = _load().main(["--smoke", "--out", str(out)])
    return out, results


def test_smoke_writes_every_section(smoke):
    out, results = smoke
    data = json.loads((out / "gpu_bench.json").read_text())
    gb = _load()
    assert data["summary"]["sections"] == {name: "ok" for name in gb.SECTIONS}
    assert data["meta"]["smoke"] and data["meta"]["wall_s"] > 0
    assert results["summary"] == data["summary"]
    assert "=== distill: ok" in (out / "gpu_bench.log").read_text()


def test_smoke_sampler_grid_phases_and_flops(smoke):
    s = smoke[1]["sampler"]
    ok = [v for v in s["variants"] if v["status"] == "ok"]
    grid = {(v["dtype"], v["channels_last"]) for v in ok if v["batch"] == 4}
    assert grid == {(d, cl) for d in ("float32", "bfloat16") for cl in (False, True)}
    assert any(v["batch"] == 2 for v in ok)  # the grid's best at the other batch
    for v in ok:
        assert v["images_per_s"] > 0 and v["images"] == 8 and len(v["batch_s"]) == 8 // v["batch"]
        assert v["finite_fraction"] == 1.0 and v["share_of_peak"] is None  # no ceiling for a CPU
    f = s["flops"]
    assert s["denoise_steps"] == 5
    assert f["per_image"] == pytest.approx(5 * f["unet_step"] + f["encode"] + f["decode"])
    p = s["phases"]
    assert p["unet_calls"] == 5 and min(p["encode_s"], p["unet_s"], p["decode_s"]) > 0
    assert p["encode_s"] + p["unet_s"] + p["decode_s"] + p["other_s"] == pytest.approx(p["total_s"])
    assert s["best"]["label"] in {v["label"] for v in ok}
    assert "AttnProcessor2_0" in s["attention"]


def test_smoke_baselines_profile_compile(smoke, tmp_path):
    out, r = smoke
    b = r["baselines"]
    assert b["per_image"]["images"] == 2 and b["per_image"]["images_per_s"] > 0
    assert b["batched"]["batch"] == r["sampler"]["best"]["batch"] and b["batched"]["images_per_s"] > 0
    # same images, seeds and dtype: the pipeline and ccd_sample agree (to rounding: batch 1 vs a batch of 2)
    assert b["max_abs_diff_vs_ccd"] < {"float32": 1e-4, "bfloat16": 0.1}[b["dtype"]]
    prof = r["profile"]
    text = (out / prof["file"]).read_text()
    assert len(prof["top"]) == 15 and prof["top"][0]["name"][:40] in text
    assert sum(t["share"] for t in prof["top"]) <= 1.0 + 1e-9 and sum(prof["by_category"].values()) == pytest.approx(1)
    stages = r["compile"]["stages"]
    assert [c["compiled"] for c in stages] == ["unet", "unet+decoder"]
    assert [c["graphs_compiled"] for c in stages] == [1, 1]  # no recompiles across the timesteps and batches
    for c in stages:
        assert c["status"] == "ok" and c["images_per_s"] > 0 and len(c["warmup_s"]) == 2
        assert c["compile_s"] == pytest.approx(c["warmup_s"][0] - c["seconds_per_batch_median"])
    assert r["compile"]["result"]["images_per_s"] == max(c["images_per_s"] for c in stages)
    s = r["summary"]
    assert s["best"]["images_per_s"] == max(v["images_per_s"] for v in [*r["sampler"]["variants"], *stages]
                                            if v["status"] == "ok")
    assert s["vs_pipeline_per_image"] == pytest.approx(s["best"]["images_per_s"] / b["per_image"]["images_per_s"])


def test_smoke_end_to_end_and_distill(smoke):
    e = smoke[1]["end_to_end"]
    assert (e["images"], e["failures"], e["shards"]) == (8, 0, 2)
    assert e["profile"]["calls"]["sampling"] == 2 and e["profile"]["calls"]["png"] == 8
    assert e["profile"]["sampling_s"] > 0 and e["profile"]["png_s"] > 0 and e["png_bytes_per_image"] > 1000
    assert e["images_per_s"] > 0 and e["sampler_alone"]["images_per_s"] > 0 and 0 <= e["gpu_idle_share"] < 1
    d = smoke[1]["distill"]
    assert d["default"]["step_s"]["memory"] > 0 and d["default"]["step_s"]["shards"] > 0 and d["default"]["ratio"] > 0
    assert d["deform"]["available"] == bool(d["deform"].get("impls"))


def test_distill_section_times_each_deform_implementation(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("d4ir.distill.deform")
    fake.IMPLS = ("auto", "slow", "fast")

    @contextlib.contextmanager
    def using(**changes):
        calls.append(changes)
        yield

    fake.using = using
    monkeypatch.setitem(sys.modules, "d4ir.distill.deform", fake)
    gb = _load()
    quick = gb.SMOKE_DISTILL.replace("--num-workers 1", "--num-workers 0").replace("--batch-size 2", "--batch-size 1")
    r = gb.main(["--smoke", "--sections", "distill", "--distill", quick, "--out", str(tmp_path)])
    deform = r["distill"]["deform"]
    assert calls == [{"impl": "slow"}, {"impl": "fast"}]
    assert deform["available"] and set(deform["impls"]) == {"slow", "fast"}
    assert all(v["status"] == "ok" and v["step_s"]["memory"] > 0 for v in deform["impls"].values())
    assert deform["fastest"] in ("slow", "fast")


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    gb = _load()
    import gpu_e2e

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(gpu_e2e, "end_to_end_section", broken)
    r = gb.main(["--smoke", "--sections", "end_to_end,profile", "--out", str(tmp_path)])
    assert r["end_to_end"]["status"] == "error" and "disk on fire" in r["end_to_end"]["error"]
    assert r["profile"]["status"] == "ok"
    assert json.loads((tmp_path / "gpu_bench.json").read_text())["summary"]["sections"] == {
        "end_to_end": "error", "profile": "ok"}


@pytest.mark.parametrize("argv, message", [
    (["--sections", "sampler,nope"], "unknown section(s) nope"),
    (["--budget", "0"], "--budget must be > 0"),
    (["--dtypes", "float8"], "--dtypes must be a comma list"),
    (["--size", "60"], "--size must be a positive multiple of 8"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _load().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
