"""The embedded demo data built by pipelines/demo_data.py (tiny sizes, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from d4ir.pipelines.demo_data import SPLITS, build_demo_data
from PIL import Image

SMALL = {"size": 32, "n_original": 6, "n_test": 3, "n_web_degraded": 5, "n_web_clean": 4, "progress": False}
FOLDERS = {  # folder -> expected count under SMALL
    "original/degraded": 6, "original/clean": 6, "test/degraded": 3, "test/clean": 3,
    "web_degraded": 5, "web_clean": 4,
}


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.png")}


def photo_of(stem: str) -> str:
    return stem.rsplit("_", 1)[0]


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return build_demo_data(tmp_path_factory.mktemp("demo") / "data", **SMALL)


def test_layout_counts_and_images(demo):
    manifest = json.loads((demo / "manifest.json").read_text())
    for task in ("derain", "dehaze", "desnow"):
        for folder, n in FOLDERS.items():
            files = sorted((demo / task / folder).glob("*.png"))
            assert len(files) == n, (task, folder)
            img = Image.open(files[0])
            assert img.size == (32, 32) and img.mode == "RGB"
        assert manifest["counts"][task] == {"original": 6, "test": 3, "web_degraded": 5, "web_clean": 4}
    readme = (demo / "README.md").read_text()
    assert "astronaut" in readme and "Rain100L" in readme and '"seed": 0' in readme


def test_paired_sets_share_stems(demo):
    for task in ("derain", "dehaze", "desnow"):
        for split in ("original", "test"):
            degraded, clean = stems(demo / task / split / "degraded"), stems(demo / task / split / "clean")
            assert degraded == clean and len(degraded) == FOLDERS[f"{split}/clean"]


def test_groups_have_disjoint_source_photos(demo):
    """Teacher's pairs, test pairs and the web pool share no photo; both web sets come from the one pool, as
    tiles whose boxes never overlap (no web clean photo is a web degraded image's source)."""
    manifest = json.loads((demo / "manifest.json").read_text())
    task = demo / "derain"
    sources = {
        "original": {photo_of(s) for s in stems(task / "original" / "clean")},
        "test": {photo_of(s) for s in stems(task / "test" / "clean")},
        "web": {photo_of(s) for s in stems(task / "web_degraded") | stems(task / "web_clean")},
    }
    names = list(sources)
    for i, a in enumerate(names):
        assert sources[a] <= set(SPLITS[a])
        for b in names[i + 1 :]:
            assert not sources[a] & sources[b], (a, b)
    for split in ("original", "test"):
        assert {r["photo"] for r in manifest["crops"][split]} == sources[split]
    web = manifest["crops"]["web_degraded"] + manifest["crops"]["web_clean"]
    assert {r["photo"] for r in web} == sources["web"]
    boxes = {(r["photo"], *r["box"]) for r in web}
    assert len(boxes) == len(web)  # no tile twice
    for p, y, x, side in boxes:
        for q, y2, x2, side2 in boxes:
            if p == q and (y, x) != (y2, x2):
                assert y + side <= y2 or y2 + side2 <= y or x + side <= x2 or x2 + side2 <= x  # disjoint pixels
    # and no web clean image is byte-equal to a clean image of the teacher's pairs
    web_clean = {p.read_bytes() for p in (task / "web_clean").glob("*.png")}
    assert not web_clean & {p.read_bytes() for p in (task / "original" / "clean").glob("*.png")}


def test_web_sets_share_the_pool_shuffled():
    """The full-size demo's web clean and web degraded sets both draw from most pool photos (not one set of
    subjects each, which gave the generator other colours than the web rain)."""
    import d4ir.pipelines.demo_data as dd

    photos = {n: dd._load_photo(n) for n in SPLITS["web"]}
    sets = dd.web_tiles(photos, 96, (48, 48), np.random.default_rng([0, 100, 2]))
    degraded, clean = ({r["photo"] for r, _ in sets[k]} for k in ("web_degraded", "web_clean"))
    assert len(degraded & clean) >= 5
    with pytest.raises(ValueError, match="tiles"):
        dd.web_tiles(photos, 96, (500, 500), np.random.default_rng(0))


def test_degraded_images_are_plausible(demo):
    for split in ("original", "test"):
        for name in stems(demo / "derain" / split / "clean"):
            clean = read(demo / "derain" / split / "clean" / f"{name}.png")
            rainy = read(demo / "derain" / split / "degraded" / f"{name}.png")
            assert np.all(rainy >= clean) and rainy.mean() > clean.mean()
            hazy = read(demo / "dehaze" / split / "degraded" / f"{name}.png")
            assert hazy.std() < clean.std() and np.abs(hazy - clean).mean() > 0.02
            snowy = read(demo / "desnow" / split / "degraded" / f"{name}.png")
            assert snowy.mean() > clean.mean()
    # the three tasks share the clean crops
    a = snapshot(demo / "derain" / "original" / "clean")
    assert a == snapshot(demo / "desnow" / "original" / "clean")


def test_web_degraded_sets_are_varied(demo):
    options = json.loads((demo / "manifest.json").read_text())["options"]
    assert {o["level"] for o in options["derain"]["web_degraded"]} == {"light", "heavy"}
    assert {o["level"] for o in options["derain"]["original"]} == {"light"}
    assert {o["level"] for o in options["desnow"]["web_degraded"]} == {"medium", "heavy"}
    betas = [o["beta"] for o in options["dehaze"]["web_degraded"]]
    assert len(set(betas)) == len(betas)


def test_rebuild_is_byte_identical_and_task_subsets_agree(demo, tmp_path):
    again = build_demo_data(tmp_path / "again", **SMALL)
    assert snapshot(again) == snapshot(demo)
    only_haze = build_demo_data(tmp_path / "haze", tasks=("dehaze",), **SMALL)
    assert snapshot(only_haze / "dehaze") == snapshot(demo / "dehaze")
    other_seed = build_demo_data(tmp_path / "seed1", seed=1, tasks=("derain",), **SMALL)
    assert snapshot(other_seed / "derain") != snapshot(demo / "derain")


def test_complete_folder_is_skipped_and_incomplete_rebuilt(tmp_path):
    out = build_demo_data(tmp_path / "d", tasks=("desnow",), **SMALL)
    probe = out / "desnow" / "web_clean" / sorted(stems(out / "desnow" / "web_clean"))[0]
    probe = probe.with_suffix(".png")
    before = probe.stat().st_mtime_ns
    build_demo_data(out, tasks=("desnow",), **SMALL)
    assert probe.stat().st_mtime_ns == before  # untouched
    data = probe.read_bytes()
    probe.unlink()  # a missing file makes the folder incomplete
    build_demo_data(out, tasks=("desnow",), **SMALL)
    assert probe.read_bytes() == data
    # other parameters rebuild, and stale images from the larger build disappear
    build_demo_data(out, tasks=("desnow",), **{**SMALL, "n_web_clean": 2})
    assert len(stems(out / "desnow" / "web_clean")) == 2
    assert json.loads((out / "manifest.json").read_text())["params"]["n_web_clean"] == 2


@pytest.mark.parametrize(
    "kwargs",
    [{"tasks": ("derain", "defog")}, {"tasks": ()}, {"tasks": ("derain", "derain")}, {"size": 4},
     {"n_test": 0}, {"n_web_clean": 2.5}],
)
def test_bad_parameters_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        build_demo_data(tmp_path / "bad", **{**SMALL, **kwargs})
    assert not (tmp_path / "bad" / "manifest.json").exists()
