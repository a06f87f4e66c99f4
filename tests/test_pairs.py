"""Paired-set layouts: each benchmark's naming is recognised; unpaired files are skipped and named with their
reason, and a set with no pair left is an error naming them."""

from pathlib import Path

import numpy as np
import pytest
from d4ir.shards.pairs import UnpairedError, find_pairs
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _img(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)


def _layout(root: Path, files: list[str]) -> Path:
    for f in files:
        _img(root / f)
    return root


def _names(pairs):
    return [(p.degraded.relative_to(p.degraded.parents[1]).as_posix(), p.clean.name) for p in pairs]


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            ["degraded/2.png", "degraded/10.png", "clean/2.png", "clean/10.png"],
            [("2", "2.png"), ("10", "10.png")],
        ),
        (["rainy/rain-1.png", "gt/norain-1.png"], [("rain-1", "norain-1.png")]),
        (["input/a.png", "target/a.png"], [("a", "a.png")]),
        (
            ["hazy/0001_0.8_0.2.jpg", "hazy/0001_1_0.04.jpg", "gt/0001.png"],
            [("0001_0.8_0.2", "0001.png"), ("0001_1_0.04", "0001.png")],
        ),
        (["hazy/0002_0.9_0.1.jpg", "clear/0002.png"], [("0002_0.9_0.1", "0002.png")]),
        (["synthetic/x_1.jpg", "gt/x_1.jpg"], [("x_1", "x_1.jpg")]),
        (["Snow/7.tif", "Gt/7.tif"], [("7", "7.tif")]),
    ],
)
def test_two_folder_layouts(tmp_path: Path, files, expected):
    pairs = find_pairs(_layout(tmp_path, files))
    assert [(p.name, p.clean.name) for p in pairs] == expected


def test_prenet_flat_and_test_layouts(tmp_path: Path):
    flat = _layout(tmp_path / "train", ["rain-1.png", "norain-1.png", "rain-2.png", "norain-2.png"])
    assert [(p.name, p.clean.name) for p in find_pairs(flat)] == [
        ("rain-1", "norain-1.png"),
        ("rain-2", "norain-2.png"),
    ]
    test = _layout(tmp_path / "test", ["rainy/rain-001.png", "norain-001.png"])
    assert [(p.name, p.clean.name) for p in find_pairs(test)] == [("rain-001", "norain-001.png")]


def test_unpaired_files_are_skipped_and_named(tmp_path: Path):
    root = _layout(tmp_path / "set", ["degraded/1.png", "degraded/2.png", "clean/1.png", "clean/3.png"])
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["1"]
    assert pairs.skipped == [("2", "degraded/2.png: no clean partner"), ("3", "clean/3.png: no degraded partner")]
    none_left = _layout(tmp_path / "none", ["degraded/2.png", "clean/3.png"])
    with pytest.raises(UnpairedError) as err:
        find_pairs(none_left)
    assert str(err.value) == (f"{none_left}: no usable pair (2 skipped: 2: degraded/2.png: no clean partner; "
                              "3: clean/3.png: no degraded partner)")


def test_unknown_layout_and_missing_folder(tmp_path: Path):
    _layout(tmp_path / "x", ["photos/1.png"])
    with pytest.raises(UnpairedError, match="no paired layout"):
        find_pairs(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        find_pairs(tmp_path / "absent")


@pytest.mark.skipif(not (SHARED / "rain100l_test").exists(), reason="shared benchmark data absent")
def test_rain100l_test_has_100_pairs():
    pairs = find_pairs(SHARED / "rain100l_test")
    assert len(pairs) == 100
    assert pairs[0].name == "1" and pairs[-1].name == "100"
    assert all(p.degraded.name == p.clean.name for p in pairs)
