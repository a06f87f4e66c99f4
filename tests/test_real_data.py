"""The real-parts setting (configs/real-derain.json): its builder keeps every Rain100L test image out of every
training folder (checked here by pixels, independently of the builder's own record), and the Procedural row's
images are the physical renderer on the web clean photos, reproducible from the seed.

The builder tests read ../shared/data (the Rain100L test set and the web photos) and skip without it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from d4ir.pipelines.experiments.data_common import pixels_key
from d4ir.pipelines.experiments.datasets import prepare
from d4ir.pipelines.experiments.procedural import render_folder
from d4ir.shards.folders import scan_images
from d4ir.shards.images import read_rgb
from d4ir.shards.pairs import find_pairs
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not (SHARED / "rain100l_test").is_dir(),
                                  reason=f"the real benchmark images are not here ({SHARED})")


def _keys(folder: Path) -> set[str]:
    return {pixels_key(read_rgb(p, min_side=1)) for p in scan_images(folder, min_side=1).paths}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("exp")
    info = prepare("real-derain", SHARED, out, seed=0)
    return out / "data" / "real-derain", info


@needs_shared
def test_no_rain100l_test_image_reaches_a_training_folder(built):
    root, info = built
    test_pairs = [p for p in find_pairs(SHARED / "rain100l_test") if 51 <= int(p.name) <= 100]
    private_pairs = [p for p in find_pairs(SHARED / "rain100l_test") if int(p.name) <= 50]
    test = {pixels_key(read_rgb(q, min_side=1)) for p in test_pairs for q in (p.degraded, p.clean)}
    private = {pixels_key(read_rgb(q, min_side=1)) for p in private_pairs for q in (p.degraded, p.clean)}
    assert len(test_pairs) == 50 and set(info["test_pixel_keys"]) == test
    assert _keys(root / "test" / "degraded") | _keys(root / "test" / "clean") == test
    web_degraded, web_clean = _keys(root / "web_degraded"), _keys(root / "web_clean")
    original = _keys(root / "original" / "degraded")
    assert not (web_degraded | web_clean | original) & test  # no training row can read a test image
    assert not (web_degraded | web_clean) & private  # the web folders hold none of the teacher's stand-in data
    assert original <= private and len(original) == 50
    counts = info["counts"]
    assert counts["web_degraded"] >= 147 and counts["web_clean"] == 24 + 80 + 30 + 18
    assert json.loads((root / "data.json").read_text())["counts"] == counts


@needs_shared
def test_a_finished_build_is_reused_and_another_seed_refused(built):
    root, info = built
    assert prepare("real-derain", SHARED, root.parents[1], seed=0) == info
    with pytest.raises(ValueError, match="built with other settings"):
        prepare("real-derain", SHARED, root.parents[1], seed=1)


def test_procedural_images_are_the_renderer_on_the_web_clean_photos(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(clean / f"c{i}.png")
    a = render_folder(clean, tmp_path / "a", weather="derain", count=6, size=32, seed=3)
    b = render_folder(clean, tmp_path / "b", weather="derain", count=6, size=32, seed=3)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"proc-{i:06d}.png" for i in range(6)] and a == b and a["photos"] == 3
    assert set(a["levels"]) <= {"derain:light", "derain:heavy"} and sum(a["levels"].values()) == 6
    for name in files:
        img = read_rgb(tmp_path / "a" / name)
        assert img.shape == (32, 32, 3)
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # rain is screen-blended: never darker than the photo it was rendered on, and brighter somewhere
    c = render_folder(clean, tmp_path / "c", weather="derain", count=6, size=32, seed=4)
    assert c["images"] == 6 and any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
                                    for f in files)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable web clean photo"):
        render_folder(tmp_path / "empty", tmp_path / "d", weather="derain", count=1, size=32, seed=0)


def test_the_real_table_shows_the_papers_closest_table_by_task():
    from d4ir.pipelines.experiments.published import PUBLISHED, published

    assert published("real", "D4IR", "derain") == PUBLISHED["1"]["D4IR"]  # Table 1's, not Table 3's
    assert published("real", "M3", "derain") == PUBLISHED["3"]["M3"]
    assert published("real", "Teacher", "dehaze") == PUBLISHED["2"]["Teacher"]
    assert published("real", "Procedural", "derain") is None  # this project's row: the paper has none
    assert published("real", "D4IR") is None and published("1", "D4IR") == PUBLISHED["1"]["D4IR"]
