"""What the CLIP-based rewards share: CLIP's image preprocessing applied to a (B, 3, H, W) tensor in [0, 1]
(no round trip through PIL), the text side of CLIP, dtype choice and `from_pretrained` arguments.

Only imported inside the rewards' `load` and `__call__`, so it may import torch at the top.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is float16 on CUDA (half the memory, as the reward models are used in practice) and float32
    elsewhere (CPU half precision is slow and inexact)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained` keyword for the weights' dtype (transformers 5 renamed `torch_dtype` to `dtype`), so
    large models are materialised in that dtype instead of float32 first."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """Silence transformers' load report while loading part of a checkpoint on purpose (CLIP's vision tower
    out of a full CLIP: every text-tower weight is "unexpected")."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _size_entry(size, key: str):
    """A key of an image processor's `size` / `crop_size` (a dict in transformers 4, a SizeDict in 5)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ClipImagePreprocessor:
    """CLIP's preprocessing, read from a hub image-processor config: bicubic resize of the shortest side (or to a
    fixed height x width), centre crop, normalisation by the processor's mean and std.

    It works on float tensors on the reward's device; the one difference from `CLIPImageProcessor` is that the
    8-bit rounding of a PIL image is skipped (tests/test_rewards.py bounds the difference).
    """

    def __init__(self, image_processor):
        self.size = image_processor.size
        self.crop_size = image_processor.crop_size if getattr(image_processor, "do_center_crop", True) else None
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str) -> ClipImagePreprocessor:
        from transformers import AutoImageProcessor

        return cls(AutoImageProcessor.from_pretrained(path))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        shortest = _size_entry(self.size, "shortest_edge")
        if shortest is None:
            return _size_entry(self.size, "height"), _size_entry(self.size, "width")
        short, long = (height, width) if height <= width else (width, height)
        long = int(shortest * long / short)
        return (shortest, long) if height <= width else (long, shortest)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> CLIP pixel values (B, 3, crop, crop), float32 on the images' device."""
        images = images.float()
        size = self.resized_shape(*images.shape[-2:])
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
            images = images.clamp(0, 1)  # bicubic overshoots; PIL clips to the 8-bit range
        if self.crop_size is not None:
            crop_height, crop_width = _size_entry(self.crop_size, "height"), _size_entry(self.crop_size, "width")
            top, left = (images.shape[-2] - crop_height) // 2, (images.shape[-1] - crop_width) // 2
            images = images[..., top:top + crop_height, left:left + crop_width]
        return (images - self.mean.to(images.device)) / self.std.to(images.device)


def clip_text_embeddings(model, tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Projected CLIP text embeddings (B, D) in float32, not normalised; prompts longer than CLIP's context
    (77 tokens) are truncated, as CLIP's processor does."""
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    output = model.text_model(input_ids=tokens["input_ids"].to(device),
                              attention_mask=tokens["attention_mask"].to(device))
    return model.text_projection(output.pooler_output).float()


def clip_image_embeddings(model, preprocess: ClipImagePreprocessor, images: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings (B, D) in float32 of a `CLIPModel`, not normalised."""
    return clip_pixel_embeddings(model, preprocess(images.to(next(model.parameters()).device)))


def clip_pixel_embeddings(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected CLIP image embeddings (B, D) in float32 of already preprocessed pixel values, for callers that
    preprocess images of different sizes one by one (the `geneval` reward's object crops)."""
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(parameter.device, parameter.dtype)
    return model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output).float()
