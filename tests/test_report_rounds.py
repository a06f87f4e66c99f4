"""The rounds grid (clean source | round 0 | later rounds, rows matched by clean photo) and the colour statistics
of the synthesized images, the reports' D4IR-against-M0-and-Data sentence, the caveat chosen by the SD that
synthesized a run, and the demo's export table in the experiments report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import round_manifest
from d4ir.pipelines.experiments.report_rows import TINY_SD_NOTE, WEATHER_SD_NOTE, colour_table, d4ir_sentence
from d4ir.pipelines.report import sd_note
from d4ir.pipelines.rounds import colour_stats, rounds_grid
from d4ir.shards.images import save_png
from d4ir.shards.layout import RunLayout
from d4ir.shards.writer import write_manifest, write_shard
from PIL import Image


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _round(folder: Path, cleans: list[Path], values: list[int], sd: str = "weather") -> None:
    samples = [{"__key__": f"s{i:03d}", "degraded.png": _png(v), "json": {"clean": str(c)}}
               for i, (c, v) in enumerate(zip(cleans, values))]
    write_shard(folder, 0, samples)
    write_manifest(folder, round_manifest(sd=sd, complete=True))


def test_rounds_grid_matches_rows_by_clean_source(tmp_path: Path):
    cleans = []
    for i in range(3):
        cleans.append(tmp_path / "clean" / f"c{i}.png")
        save_png(cleans[-1], np.full((16, 16, 3), 10 * i, np.uint8))
    layout = RunLayout(tmp_path / "run")
    _round(layout.round_shards(0), cleans, [100, 101, 102])
    _round(layout.round_shards(1, "d4ir"), cleans[::-1], [202, 201, 200])  # same photos, another order
    out = rounds_grid(layout.root, tmp_path / "grid.png", num=3, cell=16)
    grid = np.asarray(Image.open(out).convert("RGB"))
    # 3 rows x 3 columns (clean source, round 0, round 1) of 16 px cells, 2 px gaps, a 16 px label band
    assert grid.shape[1] == 3 * 16 + 4 * 2
    for row in range(3):
        top = 16 + 2 + row * (16 + 2)
        cells = [int(grid[top + 8, 2 + col * 18 + 8, 0]) for col in range(3)]
        assert cells == [10 * row, 100 + row, 200 + row], (row, cells)  # one photo per row
    assert sd_note(layout.root) == WEATHER_SD_NOTE
    # colour statistics: each round's synthesized images against their clean sources (grey here: saturation 0)
    lines = colour_table([(0, layout.round_shards(0)), (1, layout.round_shards(1, "d4ir"))], None, None)
    assert "| round 0: clean sources | 3 | 0.000 | 0.039 | 0.039 | 0.039 |" in lines
    assert "| round 1: synthesized (" in lines[-1] and "(- the sources' saturation) | 3 | 0.000 | 0.788 |" in lines[-1]


def test_colour_stats_measure_saturation_and_channel_means():
    grey = np.full((16, 16, 3), 100, np.uint8)
    pink = np.zeros((24, 16, 3), np.uint8) + np.array([255, 153, 204], np.uint8)
    s = colour_stats([grey, pink])
    assert s["count"] == 2 and s["saturation"] == pytest.approx((0 + 102 / 255) / 2)
    assert s["r"] == pytest.approx((100 + 255) / 2 / 255) and s["g"] == pytest.approx((100 + 153) / 2 / 255)
    assert colour_stats([]) == {"count": 0}


def test_caveat_follows_the_sd_of_round_zero(tmp_path: Path):
    layout = RunLayout(tmp_path)
    assert "Every number above" in sd_note(tmp_path)  # no round: the generic note
    write_manifest(layout.round_shards(0), round_manifest(sd="tiny"))
    assert sd_note(tmp_path) == TINY_SD_NOTE


def test_d4ir_sentence_states_the_measured_gaps():
    def row(psnr, ref):
        return {"type": "KD", "count": 16, "mean": {"psnr": psnr, "ref_psnr": ref}}

    evals = {"Data": row(21.0, 25.0), "M0": row(20.5, 24.0), "D4IR": row(20.75, 24.5)}
    text = d4ir_sentence(evals)
    assert "20.75 dB" in text and "+0.25 dB from M0 (20.50 dB)" in text and "-0.25 dB from Data (21.00 dB)" in text
    assert "at least as well as" in text and "16 test images" in text
    assert "less well than" in d4ir_sentence({**evals, "D4IR": row(20.0, 24.0)})
    assert d4ir_sentence({**evals, "D4IR": None}) is None
    json.dumps(text)  # plain text


def test_the_experiments_report_shows_the_demo_export_and_its_scope(tmp_path: Path):
    """The demo's export table (teacher and D4IR student in ONNX, onnxruntime latency) and the demo's scope
    paragraph appear in the one experiments report; a row not run yet is named so."""
    from d4ir.pipelines.experiments import load_config, run_experiments
    from d4ir.pipelines.experiments.report_rows import DEMO_SCOPE

    config = {"out": "exp", "sd": "weather", "tasks": {"derain": {"teacher": {"checkpoint": "t.safetensors"},
                                                                  "original": "o", "web_degraded": "w",
                                                                  "web_clean": "c", "test": {"demo test": "t"}}},
              "tables": ["demo"]}
    (tmp_path / "demo.json").write_text(json.dumps(config))
    rows = {k: {"params": p, "onnx_bytes": b, "max_diff": 3e-7, "median_ms": ms, "latencies_ms": [ms]}
            for k, p, b, ms in (("teacher", 8_930_000, 19_600_000, 400.0), ("student", 4_460_000, 5_200_000, 100.0))}
    export = tmp_path / "exp" / "derain" / "export"
    export.mkdir(parents=True)
    (export / "latency.json").write_text(json.dumps(
        {"size": 256, "threads": 1, "reps": 5, "models": rows,
         "student_vs_teacher": {"latency": 0.25, "params": 0.4994, "onnx_bytes": 0.2653}}))
    report = run_experiments(load_config(tmp_path / "demo.json"), report_only=True, log=lambda _: None).read_text()
    assert "| teacher | 4.46 |" not in report and "| teacher | 8.93 | 19.6 | 400 | 3.0e-07 |" in report
    assert "| student | 4.46 | 5.2 | 100 | 3.0e-07 |" in report
    assert "latency 0.25x, parameters 0.50x, file 0.27x" in report
    assert "| KD | D4IR (ours: CCD + DPA, joint phase, rounds) | not run yet |" in report
    assert report.split("\n\n")[1] == DEMO_SCOPE  # the first paragraph (no rows yet: no sentence with numbers)
