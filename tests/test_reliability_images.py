"""The image reader keeps its stated rules (docs/reliability.md, class 11): 16-bit colour is rounded value / 257
whatever the PNG filters, a multi-frame file gives its first frame and is counted as a conversion, an unreadable
file says "permission denied", and dangling symlinks, symlink loops and FIFOs are counted, never dropped."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import d4ir.shards.images as images_mod
import numpy as np
import pytest
from d4ir.shards.folders import scan_images
from d4ir.shards.images import ImageSkipped, read_rgb
from PIL import Image


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def png16(arr: np.ndarray, filters: tuple[int, ...] = (0, 1, 2, 3, 4)) -> bytes:
    """A 16-bit PNG of arr [H, W, C] (C = 3: RGB, 4: RGBA), each row with the next of the five PNG filters."""
    h, w, c = arr.shape
    bpp = 2 * c
    rows = [arr[y].astype(">u2").tobytes() for y in range(h)]
    out, prev = [], bytes(w * bpp)
    for y, row in enumerate(rows):
        f = filters[y % len(filters)]
        enc = bytearray()
        for i, x in enumerate(row):
            left = row[i - bpp] if i >= bpp else 0
            up, upleft = prev[i], (prev[i - bpp] if i >= bpp else 0)
            pred = [0, left, up, (left + up) // 2, _paeth(left, up, upleft)][f]
            enc.append((x - pred) % 256)
        out.append(bytes([f]) + bytes(enc))
        prev = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    colour_type = {3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(out)))
            + chunk(b"IEND", b""))


def test_16_bit_colour_is_rounded_value_over_257_under_every_png_filter(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (10, 12, 3)).astype(np.uint16)
    rgb[0, :4] = [[0, 128, 129], [383, 384, 385], [65535, 32767, 32768], [255, 256, 257]]  # rounding boundaries
    (tmp_path / "rgb16.png").write_bytes(png16(rgb))
    notes: list[str] = []
    got = read_rgb(tmp_path / "rgb16.png", min_side=1, notes=notes)
    np.testing.assert_array_equal(got, np.rint(rgb / 257.0).astype(np.uint8))
    assert "16-bit" in notes
    # Pillow alone keeps the high byte: about a quarter of the values differ by one from the stated rule
    with Image.open(tmp_path / "rgb16.png") as im:
        assert (np.asarray(im) != got).mean() > 0.1

    rgba = rng.integers(0, 65536, (8, 9, 4)).astype(np.uint16)
    rgba[..., 3] = 65535  # opaque: compositing over white changes nothing
    (tmp_path / "rgba16.png").write_bytes(png16(rgba))
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba16.png", min_side=1),
                                  np.rint(rgba[..., :3] / 257.0).astype(np.uint8))
    rgba[..., 3] = 0  # transparent: white
    (tmp_path / "clear16.png").write_bytes(png16(rgba))
    assert (read_rgb(tmp_path / "clear16.png", min_side=1) == 255).all()


def test_a_multi_frame_file_gives_its_first_frame_and_is_counted(tmp_path):
    frames = [Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.tif", save_all=True, append_images=frames[1:])
    for name in ("anim.png", "anim.tif"):
        notes: list[str] = []
        assert (read_rgb(tmp_path / name, notes=notes) == 10).all(), name
        assert "multi-frame (first frame)" in notes
    scan = scan_images(tmp_path)
    assert scan.counts()["converted: multi-frame (first frame)"] == 2 and len(scan.paths) == 2


def test_unreadable_files_say_permission_denied(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "locked.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked.png"))

    monkeypatch.setattr(images_mod.Image, "open", denied)  # (tests run as root, so chmod cannot lock a file)
    with pytest.raises(ImageSkipped) as err:
        read_rgb(tmp_path / "locked.png")
    assert err.value.reason == "permission denied"
    assert scan_images(tmp_path).skipped == [(tmp_path / "locked.png", "permission denied")]


def test_links_loops_and_fifos_are_counted(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "ok.png")
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "back").symlink_to(folder)  # a folder link back to an ancestor: walked once, no loop
    (folder / "good-link.png").symlink_to(folder / "ok.png")
    scan = scan_images(folder)
    assert sorted(p.name for p in scan.paths) == ["good-link.png", "ok.png"]
    assert {p.name: r for p, r in scan.skipped} == {"dangling.png": "dangling symlink", "loop.png": "symlink loop",
                                                    "pipe.png": "not a regular file"}
    counts = scan.counts()
    assert (counts["dangling symlink"], counts["symlink loop"], counts["not a regular file"]) == (1, 1, 1)


def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    name = os.fsdecode(b"caf\xe9-\xff.png")  # Latin-1 bytes: not valid UTF-8, kept as surrogate escapes
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(Path(tmp_path) / name)
    scan = scan_images(tmp_path)
    assert len(scan.paths) == 1 and os.fsencode(scan.paths[0].name) == b"caf\xe9-\xff.png"
    assert (read_rgb(scan.paths[0]) == 7).all()


def test_16_bit_rgb_tiff_is_rounded_value_over_257_in_every_layout_and_counted(tmp_path):
    tifffile = pytest.importorskip("tifffile")  # scikit-image's dependency, so present wherever d4ir is
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 65536, (10, 12, 3)).astype(np.uint16)
    rgb[0, :4] = [[0, 128, 129], [383, 384, 385], [65535, 32767, 32768], [255, 256, 257]]  # rounding boundaries
    want = np.rint(rgb / 257.0).astype(np.uint8)
    layouts = {"plain": {}, "strips": dict(rowsperstrip=3), "zlib": dict(compression="zlib"),
               "predictor": dict(compression="zlib", predictor=True), "big-endian": dict(byteorder=">"),
               "tiled": dict(tile=(16, 16))}
    for name, kwargs in layouts.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", rgb, photometric="rgb", **kwargs)
        notes: list[str] = []
        np.testing.assert_array_equal(read_rgb(tmp_path / f"{name}.tif", min_side=1, notes=notes), want, name)
        assert notes == ["16-bit"], name
    opaque = np.concatenate([rgb, np.full((10, 12, 1), 65535, np.uint16)], axis=2)
    for name, extra in (("rgba", "unassalpha"), ("premultiplied", "assocalpha"), ("rgbx", "unspecified")):
        tifffile.imwrite(tmp_path / f"{name}.tif", opaque, photometric="rgb", extrasamples=[extra])
        np.testing.assert_array_equal(read_rgb(tmp_path / f"{name}.tif", min_side=1), want, name)
    clear = opaque.copy()
    clear[..., :3], clear[..., 3] = 0, 0  # premultiplied and fully transparent: white
    tifffile.imwrite(tmp_path / "clear.tif", clear, photometric="rgb", extrasamples=["assocalpha"])
    assert (read_rgb(tmp_path / "clear.tif", min_side=1) == 255).all()

    folder = tmp_path / "check"
    folder.mkdir()
    (folder / "a.png").write_bytes(png16(rgb))
    tifffile.imwrite(folder / "b.tif", rgb, photometric="rgb")
    tifffile.imwrite(folder / "c.tif", rgb, photometric="rgb", compression="zlib")
    assert scan_images(folder, min_side=1).counts() == {"usable": 3, "converted: 16-bit": 3}
