"""The experiments' dataset builders on a fake shared-data folder (the Rain100L split, the weather matrix: splits,
web folders, no test or training image leaking into them, reuse), the repository guard, and mixed folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from d4ir.pipelines.experiments import datasets, matrix_data
from d4ir.pipelines.experiments.inputs import resolve
from d4ir.shards.folders import scan_images
from d4ir.shards.pairs import find_pairs
from PIL import Image


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _pair(root: Path, name: str, clean: np.ndarray, clean_name: str | None = None) -> None:
    _png(root / "degraded" / f"{name}.png", np.maximum(clean, 200))
    _png(root / "clean" / f"{clean_name or name}.png", clean)


def _fake_shared(root: Path, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Every set the builders read, with tiny images; returns the Rain100L test images by number."""
    tests = {}
    for n in range(1, 101):  # 100 pairs at 480x320 would be slow: tiny images do
        tests[n] = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        _pair(root / "rain100l_test", str(n), tests[n])
    for name in set(datasets.WEB_CLEAN_SETS) | set(matrix_data.WEB_CLEAN):
        (root / name / "clean").mkdir(parents=True, exist_ok=True)
        (root / name / "degraded").mkdir(parents=True, exist_ok=True)
    photo = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    _pair(root / "hsts_synthetic", "a", photo)
    _png(root / "hazerd_samples" / "clean" / "b_1.png", photo[:30])
    _png(root / "hazerd_samples" / "clean" / "b_2.png", photo[:30])  # byte-identical duplicate
    _png(root / "hazerd_samples" / "degraded" / "b_1.png", np.maximum(photo[:30], 150))
    _png(root / "hazerd_samples" / "degraded" / "b_2.png", np.maximum(photo[:30], 170))
    _pair(root / "spa_data_samples", "r", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    _pair(root / "sots_outdoor_samples", "0001_0.8_0.2", rng.integers(0, 256, (24, 28, 3), dtype=np.uint8), "0001")
    _pair(root / "test1200_samples", "1", rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    leaked = tests[56]  # a test image stored as a "web" image: must not reach the web folders
    _pair(root / "rain100l_fullsize_samples", "norain-56", leaked)
    return tests


def test_rain100l_split_splits_and_excludes_test_images(tmp_path):
    root, work = tmp_path / "data", tmp_path / "work"
    _fake_shared(root, np.random.default_rng(0))
    info = datasets.rain100l_split(root, work, seed=0)
    assert sorted(int(p.stem) for p in (work / "train" / "clean").iterdir()) == list(range(1, 51))
    assert sorted(int(p.stem) for p in (work / "test" / "degraded").iterdir()) == list(range(51, 101))
    assert (work / "test" / "clean" / "60.png").read_bytes() == (root / "rain100l_test/clean/60.png").read_bytes()
    # web clean: hsts a, hazerd b (once), spa r, sots 0001, test1200 1; real rain: spa r, test1200 1
    assert info["counts"] == {"web_clean": 5, "synthetic_rain": 5 * datasets.RAIN_PER_PHOTO, "real_rain": 2,
                              "duplicates": 1}
    assert sorted(Path(e["path"]).parent.name for e in info["excluded"]) == ["clean", "degraded"]
    for folder in ("web_clean", "web_degraded"):
        assert not any("norain-56" in p.name for p in (work / folder).iterdir())
    syn = np.asarray(Image.open(work / "web_degraded" / "syn-hsts_synthetic-a-0.png"))
    photo = np.asarray(Image.open(root / "hsts_synthetic" / "clean" / "a.png"))
    assert syn.shape == photo.shape and (syn.astype(int) >= photo.astype(int) - 1).all()  # rain only brightens
    (work / "web_clean" / "marker").write_text("kept")  # a finished folder is reused as it is
    assert datasets.rain100l_split(root, work, seed=0) == info and (work / "web_clean" / "marker").exists()
    with pytest.raises(ValueError, match=r"other settings \(seed 0\)"):  # other renders: never mixed
        datasets.rain100l_split(root, work, seed=1)
    (work / "data.json").unlink()  # a half-built folder (no data.json) is rebuilt from scratch
    datasets.rain100l_split(root, work, seed=1)
    assert not (work / "web_clean" / "marker").exists()


def test_weather_matrix_keeps_every_test_and_training_image_out_of_the_web(tmp_path):
    root, work = tmp_path / "data", tmp_path / "work"
    _fake_shared(root, np.random.default_rng(1))
    info = matrix_data.weather_matrix(root, work, seed=0)
    assert [len(find_pairs(work / f)) for f in ("rain/train", "rain/test", "rain/spa", "haze/train", "haze/test",
                                                 "snow/train", "snow/test")] == [50, 50, 1, 2, 1, 50, 50]
    # web clean: only hsts a and test1200 1 (spa, hazerd, sots are test or training sets; norain-56 is a test image)
    assert sorted(p.name for p in (work / "web_clean").iterdir()) == ["hsts_synthetic-a.png",
                                                                      "test1200_samples-1.png"]
    assert info["counts"]["web_clean"] == 2  # fullsize norain-56 is left out, both sides:
    assert sorted(Path(e["path"]).parent.name for e in info["excluded"]) == ["clean", "degraded"]
    for weather, real in (("rain", 1), ("haze", 1), ("snow", 0)):  # test1200's rainy image, hsts' hazy one
        names = sorted(p.name for p in (work / weather / "web_degraded").iterdir())
        assert len(names) == 2 * matrix_data.PER_PHOTO + real and sum(n.startswith("real-") for n in names) == real
    snowy, clean = (np.asarray(Image.open(work / f"snow/test/{side}/60.png")) for side in ("degraded", "clean"))
    assert snowy.shape == clean.shape == (20, 24, 3) and not np.array_equal(snowy, clean)
    keys = {p.read_bytes() for p in (work / "web_clean").iterdir()}
    assert not keys & {p.read_bytes() for p in (root / "hazerd_samples" / "clean").iterdir()}
    assert any("Snow100K" in note for note in info["notes"])


def test_prepare_refuses_a_folder_inside_the_repository(tmp_path):
    with pytest.raises(ValueError, match="inside the repository"):
        datasets.prepare("rain100l-split", tmp_path, datasets.REPO_ROOT / "runs" / "x", 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        datasets.prepare("rain100l-split", tmp_path / "nowhere", tmp_path / "out", 0)


def test_mixed_folders_link_every_source(tmp_path):
    rng = np.random.default_rng(2)
    a, b = tmp_path / "a", tmp_path / "b"
    _pair(a, "1", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    _pair(b, "0001_0.8_0.2", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "0001")  # SOTS naming
    mixed = resolve((a, b), tmp_path / "mix" / "original", paired=True)
    pairs = find_pairs(mixed)
    assert [p.name for p in pairs] == ["00-1", "01-0001_0.8_0.2"]
    assert pairs[1].clean.resolve() == (b / "clean" / "0001.png").resolve()
    images = resolve((a / "clean", b / "clean"), tmp_path / "mix" / "web_clean", paired=False)
    assert len(scan_images(images, min_side=1).paths) == 2
    assert resolve(a, tmp_path / "unused", paired=True) == a and not (tmp_path / "unused").exists()
    marker = json.loads((tmp_path / "mix" / "web_clean.sources.json").read_text())
    assert marker["sources"] == [str((a / "clean").resolve()), str((b / "clean").resolve())]
    assert resolve((a / "clean", b / "clean"), images, paired=False) == images  # reused as built
