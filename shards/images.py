"""Reading image folders into RGB uint8, with a stated rule for every odd file.

Conversion rules (the file is kept):
- EXIF orientation is applied first, so pixels are stored the way a viewer shows them.
- Grayscale ("1", "L", "I;16", "I", "F") and palette ("P") images are expanded to RGB.
- Alpha ("RGBA", "LA", "PA", palette transparency) is composited over white: web photos with alpha are
  mostly cut-outs on a transparent page, and white keeps them from reading as dark or hazy.
- 16-bit samples are scaled to 8 bits by rounding value / 257 (65535 -> 255); float images are taken as
  [0, 1] when their maximum is at most 1, else as [0, 255], and clipped.
- CMYK (and YCbCr, LAB, HSV) is converted to RGB by Pillow's colour conversion.

Skip rules (the file is counted with its reason, never half-read): see `SKIP_REASONS`.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .io import atomic_write_bytes

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
SKIP_REASONS = ("zero bytes", "not an image", "truncated", "corrupt", "too small", "too large")
DEFAULT_MIN_SIDE = 32
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000 x 8000


class ImageSkipped(Exception):
    """A file that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, path: Path, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        self.reason, self.path, self.detail = reason, Path(path), detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Pillow image of any mode -> [H, W, 3] uint8 by the module's conversion rules."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 1.0
        gray = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return np.array(im.convert("RGB"), dtype=np.uint8)


def read_rgb(
    path: str | Path, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file to [H, W, 3] uint8 RGB, or raise `ImageSkipped` with the reason."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageSkipped("not an image", path, f"extension {path.suffix or '(none)'}")
    if path.stat().st_size == 0:
        raise ImageSkipped("zero bytes", path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageSkipped("too large", path, f"{w}x{h} > {max_pixels} pixels")
                if min(w, h) < min_side:
                    raise ImageSkipped("too small", path, f"{w}x{h}, shorter side < {min_side}")
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_rgb_array(im)
    except ImageSkipped:
        raise
    except UnidentifiedImageError as err:
        raise ImageSkipped("not an image", path, str(err)) from err
    except Image.DecompressionBombError as err:
        raise ImageSkipped("too large", path, str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        raise ImageSkipped("truncated" if truncated else "corrupt", path, str(err)) from err


@dataclass
class ImageScan:
    """Result of scanning a folder: usable paths (sorted) and skipped files with reasons."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        c = Counter(reason for _, reason in self.skipped)
        return {"usable": len(self.paths), **{r: c[r] for r in SKIP_REASONS if c[r]}}

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {r}" for r, n in self.counts().items() if r != "usable")
        return f"{len(self.paths)} usable" + (f", skipped: {skipped}" if skipped else "")


def list_files(root: str | Path) -> list[Path]:
    """Every regular file below `root`, recursively, sorted; hidden files and folders are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    return sorted(
        p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-1:])
    )


def scan_images(
    root: str | Path, *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> ImageScan:
    """Decode every file below `root` once and sort it into usable or skipped (with reason)."""
    scan = ImageScan(Path(root))
    for p in list_files(root):
        try:
            read_rgb(p, min_side=min_side, max_pixels=max_pixels)
            scan.paths.append(p)
        except ImageSkipped as skip:
            scan.skipped.append((p, skip.reason))
    return scan


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
