"""Image grids for the run directory, TensorBoard and `ddpo sample` (no torchvision needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2,
              min_cell: int = 64) -> torch.Tensor:
    """Tile images (N, 3, H, W) in [0, 1] into one (3, H', W') image.

    Images smaller than `min_cell` pixels are enlarged by an integer factor (nearest neighbour), so that
    16x16 samples stay readable.
    """
    count, channels, height, width = images.shape
    scale = max(1, math.ceil(min_cell / max(height, width)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        height, width = height * scale, width * scale
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for index in range(count):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[:, top:top + height, left:left + width] = images[index].float().cpu()
    return grid


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG, creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(array).save(path)
    return path
