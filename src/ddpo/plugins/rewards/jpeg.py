"""JPEG (in)compressibility (DDPO paper): the size of the image saved as JPEG at PIL quality 95, in kB.

compressibility = -size (smaller files score higher); incompressibility = +size.
"""

from __future__ import annotations

import io

import pydantic

import ddpo


def jpeg_kilobytes(images, quality: int = 95) -> list[float]:
    """Sizes in kB (1000 bytes) of images (B, 3, H, W) in [0, 1] saved as JPEG at `quality`."""
    from PIL import Image

    pixels = (images.detach().float().clamp(0, 1) * 255).round().to("cpu").byte().permute(0, 2, 3, 1).numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


class JpegOptions(ddpo.Options):
    quality: int = pydantic.Field(95, ge=1, le=100)
    """PIL JPEG quality the size is measured at (paper: 95)."""


class Compressibility(ddpo.Reward):
    """Negative JPEG size in kB at quality 95: rewards images that compress well."""

    name = "compressibility"
    Options = JpegOptions

    def __call__(self, images, prompts, metadata):
        return [-size for size in jpeg_kilobytes(images, self.options.quality)]


class Incompressibility(ddpo.Reward):
    """JPEG size in kB at quality 95: rewards images that compress badly (detail, texture)."""

    name = "incompressibility"
    Options = JpegOptions

    def __call__(self, images, prompts, metadata):
        return jpeg_kilobytes(images, self.options.quality)


@ddpo.hookimpl
def register_rewards(register):
    register(Compressibility)
    register(Incompressibility)
