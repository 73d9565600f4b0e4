"""Image grids for the run directory, TensorBoard and `ddpo sample` (no torchvision needed), and for videos
(B, 3, F, H, W) a film strip per video and an animated GIF (PIL, no video codec needed)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image


STRIP_FRAMES = 8
"""At most this many evenly spaced frames of each video in a film-strip grid."""
GIF_FPS = 8
"""Frames per second of the animated GIFs."""


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2,
              min_cell: int = 64) -> torch.Tensor:
    """Tile images (N, 3, H, W) in [0, 1] into one (3, H', W') image.

    Images smaller than `min_cell` pixels are enlarged by an integer factor (nearest neighbour), so that
    16x16 samples stay readable. Videos (N, 3, F, H, W) are film strips: one row per video, its first and last
    frame and evenly spaced ones between, at most `STRIP_FRAMES` (`columns` is ignored).
    """
    if images.ndim == 5:
        frames = images.shape[2]
        picked = torch.linspace(0, frames - 1, min(frames, STRIP_FRAMES)).round().long()
        strips = images[:, :, picked].transpose(1, 2)  # (N, F, 3, H, W)
        return make_grid(strips.flatten(0, 1), columns=len(picked), padding=padding, min_cell=min_cell)
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


def animated_grid(videos: torch.Tensor, padding: int = 2, min_cell: int = 64) -> torch.Tensor:
    """Videos (N, 3, F, H, W) in [0, 1] -> (F, 3, H', W'): frame f is the `make_grid` of every video's frame f."""
    return torch.stack([make_grid(videos[:, :, frame], padding=padding, min_cell=min_cell)
                        for frame in range(videos.shape[2])])


def gif_bytes(frames: torch.Tensor, fps: int = GIF_FPS) -> bytes:
    """Frames (F, 3, H, W) in [0, 1] as an animated GIF that loops forever."""
    import io

    array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    pictures = [Image.fromarray(frame) for frame in array]
    stream = io.BytesIO()
    pictures[0].save(stream, format="GIF", save_all=True, append_images=pictures[1:], duration=round(1000 / fps),
                     loop=0)
    return stream.getvalue()


def save_gif(frames: torch.Tensor, path: str | Path) -> Path:
    """Write frames (F, 3, H, W) in [0, 1] as an animated GIF (`gif_bytes`), creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gif_bytes(frames))
    return path
