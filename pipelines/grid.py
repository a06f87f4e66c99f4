"""A labelled PNG grid of images (e.g. clean source | prompt source | synthesized), one row per sample.

Used by `d4ir shards show` and the run report.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from d4ir.shards.io import atomic_write_bytes
from PIL import Image, ImageDraw, ImageFont

_GAP = 2  # pixels between cells
_LABEL_HEIGHT = 16
_BACKGROUND = (255, 255, 255)
_EMPTY = (200, 200, 200)  # a missing cell in a shorter row


def _as_rgb(img: np.ndarray, where: str) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"{where}: expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: expected an image [H, W, 3], got shape {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, :3]), "RGB")


def _fit(img: Image.Image, cell: int) -> Image.Image:
    """Resize to fit a cell x cell square, keeping the aspect ratio, centred on the background."""
    scale = cell / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resized = img.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    out = Image.new("RGB", (cell, cell), _BACKGROUND)
    out.paste(resized, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return out


def _clip_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-1]
    return text


def sample_grid(
    rows: list[list[np.ndarray]], path: str | Path, *, labels: list[str] | None = None, cell: int = 128
) -> Path:
    """Write a PNG grid of `rows` to `path` and return the path.

    Args:
        rows: one list of images per row, each uint8 [H, W, 3] (gray [H, W] and RGBA are accepted);
            rows may differ in length, a missing cell is left gray.
        path: the PNG to write (atomically; folders are created).
        labels: column titles drawn above the grid; as many as the longest row.
        cell: side of the square each image is fitted into, in pixels.
    """
    if not rows or not any(rows):
        raise ValueError("sample_grid needs at least one row with one image")
    if cell < 8:
        raise ValueError(f"cell must be at least 8 pixels, got {cell}")
    n_cols = max(len(r) for r in rows)
    if labels is not None and len(labels) != n_cols:
        raise ValueError(f"got {len(labels)} labels for {n_cols} columns")
    top = _LABEL_HEIGHT + _GAP if labels else 0
    width = n_cols * cell + (n_cols + 1) * _GAP
    height = top + len(rows) * cell + (len(rows) + 1) * _GAP
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    if labels:
        font = ImageFont.load_default()
        for c, label in enumerate(labels):
            x = _GAP + c * (cell + _GAP)
            draw.text((x + 2, _GAP), _clip_text(draw, str(label), font, cell - 4), fill=(0, 0, 0), font=font)

    for r, row in enumerate(rows):
        y = top + _GAP + r * (cell + _GAP)
        for c in range(n_cols):
            x = _GAP + c * (cell + _GAP)
            if c < len(row):
                canvas.paste(_fit(_as_rgb(row[c], f"row {r} column {c}"), cell), (x, y))
            else:
                canvas.paste(Image.new("RGB", (cell, cell), _EMPTY), (x, y))

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
