"""The run report's rounds grid (clean source | round 0 | later rounds, rows matched by clean photo), its
D4IR-against-M0-and-Data sentence, and the caveat chosen by the SD that synthesized the run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from conftest import round_manifest
from d4ir.pipelines.report import TINY_SD_NOTE, WEATHER_SD_NOTE, d4ir_sentence, rounds_grid, sd_note
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


def test_caveat_follows_the_sd_of_round_zero(tmp_path: Path):
    layout = RunLayout(tmp_path)
    assert "Every number above" in sd_note(tmp_path)  # no round: the generic note
    write_manifest(layout.round_shards(0), round_manifest(sd="tiny"))
    assert sd_note(tmp_path) == TINY_SD_NOTE


def test_d4ir_sentence_states_the_measured_gaps():
    def row(method, psnr, ref):
        return {"type": "KD", "method": method, "count": 16, "mean": {"psnr": psnr, "ref_psnr": ref}}

    evals = [row("Data (teacher's degraded inputs)", 21.0, 25.0), row("M0 (web degraded images)", 20.5, 24.0),
             row("D4IR (ours)", 20.75, 24.5)]
    text = d4ir_sentence(evals)
    assert "20.75 dB" in text and "+0.25 dB from M0 (20.50 dB)" in text and "-0.25 dB from Data (21.00 dB)" in text
    assert "at least as well as" in text and "16 test images" in text
    assert "less well than" in d4ir_sentence([row("D4IR (ours)", 20.0, 24.0), *evals[:2]])
    assert d4ir_sentence(evals[:2]) is None
    json.dumps(text)  # plain text
