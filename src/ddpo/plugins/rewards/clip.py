"""Prompt-image agreement under a CLIP model, through transformers' CLIP classes.

- `clipscore` (Hessel et al., 2021, without their 2.5 x max(., 0) rescaling): 100 x cos(CLIP_image(x),
  CLIP_text(prompt)) with `openai/clip-vit-large-patch14`; about 15-35 for real images and fitting prompts.
- `pickscore` (Kirstain et al., 2023, "Pick-a-Pic"): a CLIP ViT-H/14 fine-tuned on human preferences,
  `yuvalkirstain/PickScore_v1` with the processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`; the score is
  exp(logit_scale) x cos(image, text), about 18-24 (Flow-GRPO divides it by 26 to bring it near 1).

Images go through CLIP's preprocessing as tensors (resize, centre crop, normalisation); prompts are truncated
to CLIP's 77 tokens. Cost: CLIP ViT-L/14 has about 428M parameters (1.7 GB float32, 0.9 GB float16); PickScore's
ViT-H/14 about 986M (3.9 GB float32, 2 GB float16). One image and one text forward pass per sample.
"""

from __future__ import annotations

from typing import Literal

import ddpo


class _ClipCosine(ddpo.Reward):
    """Loads a CLIPModel with a processor and computes the cosine similarity of image and prompt."""

    def model_and_processor(self) -> tuple[str, str]:
        raise NotImplementedError

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor, dtype_kwargs, resolve_dtype

        model_path, processor_path = self.model_and_processor()
        dtype = resolve_dtype(self.options.dtype, device)
        self.model = transformers.CLIPModel.from_pretrained(model_path, **dtype_kwargs(dtype)).to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(processor_path)
        self.preprocess = ClipImagePreprocessor.from_pretrained(processor_path)
        self.device = device

    def cosine(self, images, prompts):
        """cos(CLIP image embedding, CLIP text embedding) per sample, (B,) float32."""
        import torch.nn.functional as F

        from ddpo.plugins.rewards.clip_preprocessing import clip_image_embeddings, clip_text_embeddings

        image = F.normalize(clip_image_embeddings(self.model, self.preprocess, images), dim=-1)
        text = F.normalize(clip_text_embeddings(self.model, self.tokenizer, prompts, self.device), dim=-1)
        return (image * text).sum(dim=-1)


class ClipScore(_ClipCosine):
    """100 x cosine similarity of the CLIP image and prompt embeddings (CLIPScore without rescaling)."""

    name = "clipscore"

    class Options(ddpo.Options):
        clip_model: str = "openai/clip-vit-large-patch14"
        """CLIP model and processor: a hub id or a local directory."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the CLIP weights (auto: float16 on CUDA, else float32)."""

    def model_and_processor(self):
        return self.options.clip_model, self.options.clip_model

    def __call__(self, images, prompts, metadata):
        return 100 * self.cosine(images, prompts)


class PickScore(_ClipCosine):
    """PickScore: human-preference CLIP, exp(logit_scale) x cosine(image, prompt), about 18-24."""

    name = "pickscore"

    class Options(ddpo.Options):
        model: str = "yuvalkirstain/PickScore_v1"
        """The PickScore CLIP weights: a hub id or a local directory."""
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        """Where the tokenizer and image preprocessing come from (PickScore ships without them)."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the CLIP weights (auto: float16 on CUDA, else float32)."""

    def model_and_processor(self):
        return self.options.model, self.options.processor

    def __call__(self, images, prompts, metadata):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)


@ddpo.hookimpl
def register_rewards(register):
    register(ClipScore)
    register(PickScore)
