"""Reading one image file into RGB uint8, with a stated rule for every odd file.

Conversion rules (the file is kept; `read_rgb` reports each rule it applied in `notes`):
- EXIF orientation is applied first, so pixels are stored the way a viewer shows them.
- Grayscale ("1", "L", "I;16", "I", "F") and palette ("P") images are expanded to RGB.
- Alpha ("RGBA", "LA", "PA", palette transparency) is composited over white: web photos with alpha are
  mostly cut-outs on a transparent page, and white keeps them from reading as dark or hazy.
- 16-bit samples, grayscale and colour, are scaled to 8 bits by rounding value / 257 (65535 -> 255). Pillow
  itself keeps only the high byte of 16-bit colour (value >> 8, off by one for a quarter of the values), so
  such files are decoded a second time for the low byte. Float images are taken as [0, 1] when their maximum
  is at most 1, else as [0, 255], and clipped.
- CMYK (and YCbCr, LAB, HSV) is converted to RGB by Pillow's colour conversion.
- A multi-frame file (animated PNG/WebP, multi-page TIFF) gives its first frame.

Skip rules (the file is counted with its reason, never half-read): see `SKIP_REASONS`. Folders are scanned by
`shards.folders.scan_images`.
"""

from __future__ import annotations

import re
import sys
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .io import atomic_write_bytes

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SKIP_REASONS = ("zero bytes", "not an image", "truncated", "corrupt", "too small", "too large",
                "permission denied", "dangling symlink", "symlink loop", "not a regular file")
CONVERSIONS = ("16-bit", "multi-frame (first frame)", "alpha over white", "grayscale", "palette", "cmyk or other")
DEFAULT_MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000


class ImageSkipped(Exception):
    """A file that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, path: Path, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        self.reason, self.path, self.detail = reason, Path(path), detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _to_rgb_array(im: Image.Image, notes: list[str]) -> np.ndarray:
    """Pillow image of any mode -> [H, W, 3] uint8 by the module's conversion rules."""
    if im.mode == "P":
        notes.append("palette")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        wide = arr.max(initial=0) > 255 or im.mode.startswith("I;16")
        notes += ["grayscale"] + (["16-bit"] if wide else [])
        gray = np.clip(np.rint(arr / (257.0 if wide else 1.0)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        notes.append("grayscale")
        arr = np.asarray(im, dtype=np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        notes.append("alpha over white")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    elif im.mode in ("1", "L"):
        notes.append("grayscale")
    elif im.mode != "RGB":
        notes.append("cmyk or other")
    return np.array(im.convert("RGB"), dtype=np.uint8)


_WIDE_RAWMODE = re.compile(r"(RGB|RGBX|RGBA|RGBa|LA);16([BLN])")
_NATIVE = "L" if sys.byteorder == "little" else "B"


def _rawmode(args: object) -> str | None:
    """The unpacker's raw mode of a tile: its args are the raw mode itself (PNG) or a tuple that starts with it
    (TIFF's raw and libtiff decoders)."""
    if isinstance(args, str):
        return args
    return args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else None


def _decode_as(path: Path, rawmode: str) -> np.ndarray:
    """The first frame of `path` unpacked with `rawmode` in every tile, as float64 [H, W, C]."""
    with Image.open(path) as im:
        im.tile = [t._replace(args=(rawmode if isinstance(t.args, str) else (rawmode, *t.args[1:])))
                   for t in im.tile]
        return np.asarray(im, dtype=np.float64)


def _wide_colour(path: Path, im: Image.Image) -> tuple[np.ndarray, bool] | None:
    """16-bit colour (RGB, RGBA, LA) as (float64 [H, W, C] in [0, 65535], premultiplied alpha?), or None for any
    other image.

    Pillow unpacks 16-bit colour samples by keeping the high byte ("RGB;16B", "RGB;16L", TIFF's native
    "RGB;16N"). Decoding once more with the other byte order's unpacker keeps the other byte of each sample
    from the same decoded stream (after PNG filters, TIFF strips, tiles, compression and predictors), so the
    two decodes together give the exact 16-bit values. Every tile must use the same raw mode (a PNG has one
    tile, a TIFF one per strip or tile). Premultiplied alpha ("RGBa") is read as stored, because Pillow's
    unpremultiplying of each byte alone cannot be recombined.
    """
    if im.mode not in ("RGB", "RGBA", "LA") or not im.tile:
        return None
    rawmodes = {_rawmode(t.args) for t in im.tile}
    found = _WIDE_RAWMODE.fullmatch(rawmodes.pop() or "") if len(rawmodes) == 1 else None
    if found is None:
        return None
    layout, order = found.group(1), found.group(2).replace("N", _NATIVE)
    premultiplied = layout == "RGBa"
    layout = "RGBA" if premultiplied else layout
    other = "L" if order == "B" else "B"
    low = _decode_as(path, f"{layout};16{other}")
    if premultiplied:
        high = _decode_as(path, f"{layout};16{order}")
    else:
        im.load()
        high = np.asarray(im, dtype=np.float64)
    return high * 256.0 + low, premultiplied


def _wide_to_rgb(wide: np.ndarray, notes: list[str], premultiplied: bool = False) -> np.ndarray:
    """[H, W, C] 16-bit values -> [H, W, 3] uint8: alpha over white in 16 bits, then rounded value / 257."""
    notes.append("16-bit")
    if wide.shape[2] in (2, 4):  # LA or RGBA
        notes.append("alpha over white")
        colour, alpha = wide[..., :-1], wide[..., -1:] / 65535.0
        wide = (colour if premultiplied else colour * alpha) + 65535.0 * (1.0 - alpha)
    if wide.shape[2] == 1:
        wide = np.repeat(wide, 3, axis=2)
    return np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)


def read_rgb(
    path: str | Path, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS,
    notes: list[str] | None = None,
) -> np.ndarray:
    """Decode one file to [H, W, 3] uint8 RGB, or raise `ImageSkipped` with the reason.

    Args:
        path: the image file.
        min_side, max_pixels: smaller or larger images are skipped ("too small", "too large").
        notes: when given, the conversion rules applied (CONVERSIONS) are appended to it.
    """
    path = Path(path)
    notes = [] if notes is None else notes
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageSkipped("not an image", path, f"extension {path.suffix or '(none)'}")
    try:
        if path.stat().st_size == 0:
            raise ImageSkipped("zero bytes", path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageSkipped("too large", path, f"{w}x{h} > {max_pixels} pixels")
                if min(w, h) < min_side:
                    raise ImageSkipped("too small", path, f"{w}x{h}, shorter side < {min_side}")
                if getattr(im, "n_frames", 1) > 1:
                    notes.append("multi-frame (first frame)")
                    im.seek(0)
                wide = _wide_colour(path, im)  # before getexif(), which loads the image and drops its tiles
                if wide is not None:
                    out = _wide_to_rgb(wide[0], notes, premultiplied=wide[1])
                    return np.ascontiguousarray(_orient(out, im.getexif().get(0x0112, 1)))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb_array(im, notes)
    except ImageSkipped:
        raise
    except PermissionError as err:
        raise ImageSkipped("permission denied", path, str(err)) from err
    except UnidentifiedImageError as err:
        raise ImageSkipped("not an image", path, str(err)) from err
    except Image.DecompressionBombError as err:
        raise ImageSkipped("too large", path, str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        raise ImageSkipped("truncated" if truncated else "corrupt", path, str(err)) from err


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation 1-8 applied to [H, W, 3] (the transposes ImageOps.exif_transpose applies)."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a[::-1], -1),
           8: lambda a: np.rot90(a)}
    return ops.get(orientation, lambda a: a)(arr)


def random_windows(rng: np.random.Generator, h: int, w: int, size: int, n: int = 1) -> list[tuple[int, int]]:
    """`n` random (top, left) corners of size x size windows inside an h x w image, drawn rows first then
    columns (`rng.integers` twice): the one random-crop rule of stage 1, stage 3 and the probe."""
    if size > h or size > w:
        raise ValueError(f"a {size}x{size} window does not fit in a {h}x{w} image")
    tops = rng.integers(0, h - size + 1, size=n)
    lefts = rng.integers(0, w - size + 1, size=n)
    return [(int(t), int(left)) for t, left in zip(tops, lefts)]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] (any device) -> [H, W, 3] uint8, rounded to nearest."""
    return t.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG bytes of [H, W, 3] uint8, deterministic (no timestamps, fixed compression)."""
    buf = BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_png(path: str | Path, arr: np.ndarray) -> None:
    atomic_write_bytes(path, encode_png(arr))
