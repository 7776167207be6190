"""Images as numpy arrays: [-1, 1] float <-> uint8, grids, PNG files (written atomically)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.checkpoint import atomic_path


def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """[N, C, H, W] floats in [-1, 1] -> [N, H, W, C] uint8 (the layout FID tools read)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], found shape {images.shape}")
    scaled = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(scaled.transpose(0, 2, 3, 1))


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2, upscale: int = 1) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+p)+p, nrow*(W+p)+p, C] uint8 image, row-major.

    ``upscale`` repeats pixels (nearest neighbour) so 16x16 digits are visible.
    """
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, C], found {images.dtype} of shape {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def label_rows(grid: np.ndarray, labels: list[str], rows: int, width: int = 260) -> np.ndarray:
    """A grid [H, W, C] uint8 with a white margin on the left holding one text label per row."""
    from PIL import Image, ImageDraw

    h, _, c = grid.shape
    canvas = Image.new("RGB", (width + grid.shape[1], h), "white")
    canvas.paste(Image.fromarray(grid if c == 3 else np.repeat(grid, 3, axis=2)), (width, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = h / max(rows, 1)
    for i, text in enumerate(labels[:rows]):
        text = text if len(text) <= 40 else text[:39] + "…"
        draw.text((4, int(i * row_height + row_height / 2) - 5), text, fill="black")
    out = np.asarray(canvas, dtype=np.uint8)
    return out if c == 3 else out[:, :, :1]


def save_png(path: str | Path, image: np.ndarray) -> None:
    """Write one [H, W, C] (C = 1 or 3) or [H, W] uint8 image as PNG, atomically."""
    from PIL import Image

    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image [H, W(, C)], found {image.dtype} of shape {image.shape}")
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def save_grid(path: str | Path, images_nchw: np.ndarray, nrow: int | None = None, upscale: int = 1) -> None:
    """[N, C, H, W] floats in [-1, 1] -> a PNG grid."""
    save_png(path, make_grid(to_uint8_nhwc(images_nchw), nrow=nrow, upscale=upscale))
