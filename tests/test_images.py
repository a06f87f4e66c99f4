"""Every odd-image case of `shards.images`: converted by its rule, or skipped with its exact reason."""

from pathlib import Path

import numpy as np
import pytest
from d4ir.shards.folders import scan_images
from d4ir.shards.images import ImageSkipped, read_rgb, to_tensor, to_uint8
from PIL import Image


def _rgb(h=40, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plain_formats_round_trip(tmp_path: Path):
    arr = _rgb()
    for ext in ("png", "bmp", "tif", "webp"):
        kw = {"lossless": True} if ext == "webp" else {}
        Image.fromarray(arr).save(tmp_path / f"a.{ext}", **kw)
        np.testing.assert_array_equal(read_rgb(tmp_path / f"a.{ext}"), arr)
    Image.fromarray(arr).save(tmp_path / "a.JPEG", quality=95)
    out = read_rgb(tmp_path / "a.JPEG")
    assert out.shape == arr.shape and out.dtype == np.uint8


def test_grayscale_and_palette_expand_to_rgb(tmp_path: Path):
    gray = _rgb()[..., 0]
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = read_rgb(tmp_path / "g.png")
    assert out.shape == (40, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    pal = Image.fromarray(_rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "p.png"), np.array(pal.convert("RGB")))


def test_alpha_is_composited_over_white(tmp_path: Path):
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[:, :24, 3] = 255  # left half opaque, right half transparent
    rgba[:, 24:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(out[0, 30], [255, 255, 255])
    la = np.stack([np.full((40, 48), 100, np.uint8), np.full((40, 48), 128, np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    # 100 * 128/255 + 255 * 127/255, rounded by Pillow's integer compositing
    assert abs(int(read_rgb(tmp_path / "la.png")[0, 0, 0]) - round(100 * 128 / 255 + 255 * 127 / 255)) <= 1


def test_sixteen_bit_scales_to_eight(tmp_path: Path):
    arr16 = np.array([[0, 257 * 10, 65535] * 16] * 40, dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "d.png")
    out = read_rgb(tmp_path / "d.png")
    np.testing.assert_array_equal(out[0, :3, 0], [0, 10, 255])


def test_cmyk_converts_to_rgb(tmp_path: Path):
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red in CMYK
    out = read_rgb(tmp_path / "c.jpg")
    assert out.shape == (40, 48, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_exif_orientation_is_applied(tmp_path: Path):
    arr = _rgb(40, 48)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    out = read_rgb(tmp_path / "o.jpg")
    assert out.shape == (48, 40, 3)


@pytest.fixture
def odd_folder(tmp_path: Path) -> Path:
    good = _rgb(64, 64)
    Image.fromarray(good).save(tmp_path / "good.png")
    sub = tmp_path / "nested" / "deeper"
    sub.mkdir(parents=True)
    Image.fromarray(good).save(sub / "good2.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "readme.txt").write_text("hello")
    Image.fromarray(_rgb(300, 300)).save(tmp_path / "trunc.jpg", quality=95)
    data = (tmp_path / "trunc.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "bad.png")
    data = bytearray((tmp_path / "bad.png").read_bytes())
    data[60:200] = bytes(140)  # zero the compressed data stream: the zlib stream or CRC fails
    (tmp_path / "bad.png").write_bytes(bytes(data))
    Image.fromarray(_rgb(16, 200)).save(tmp_path / "thin.png")
    Image.fromarray(_rgb(300, 300)).save(tmp_path / "huge.png")
    return tmp_path


def test_scan_counts_every_reason(odd_folder: Path):
    scan = scan_images(odd_folder, min_side=32, max_pixels=200 * 200)
    reasons = {p.name: r for p, r in scan.skipped}
    assert [p.name for p in scan.paths] == ["good.png", "good2.jpg"]
    assert reasons == {
        "empty.png": "zero bytes",
        "notes.png": "not an image",
        "readme.txt": "not an image",
        "trunc.jpg": "too large",  # the pixel limit is checked from the header, before decoding
        "bad.png": "corrupt",
        "thin.png": "too small",
        "huge.png": "too large",
    }
    assert scan.counts() == {
        "usable": 2,
        "zero bytes": 1,
        "not an image": 2,
        "corrupt": 1,
        "too small": 1,
        "too large": 2,
    }


def test_truncated_is_its_own_reason(odd_folder: Path):
    with pytest.raises(ImageSkipped) as err:
        read_rgb(odd_folder / "trunc.jpg")
    assert err.value.reason == "truncated"


def test_tensor_round_trip():
    arr = _rgb()
    t = to_tensor(arr)
    assert t.shape == (3, 40, 48) and float(t.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8(t), arr)
