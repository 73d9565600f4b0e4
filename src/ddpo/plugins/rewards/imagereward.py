"""`imagereward`: ImageReward (Xu et al., 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation", arXiv 2304.05977; official code THUDM/ImageReward). A BLIP (ViT-L image encoder, BERT
text encoder with cross-attention to the image) fine-tuned on 137k expert comparisons; the reward of ReFL and of
DPOK's multi-prompt runs, one of Flow-GRPO's.

    f = BERT_xattn(prompt tokens | ViT-L(x))[CLS]              (768-d; ImageReward/ImageReward.py:121-132)
    r = W5 W4 W3 W2 W1 f + b                                   (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations)
    reward = (r - 0.16717362830052426) / 1.0333394966054072    (ImageReward.py:80-81, 134)

The MLP is the LAION aesthetic predictor's (ImageReward.py:40-58: dropouts 0.2, 0.2, 0.1, inactive here). The
image goes through CLIP's preprocessing at 224 px (ImageReward.py:30-37: bicubic resize of the shortest side,
centre crop, OpenAI's mean and std); the prompt through BLIP's tokenizer, `bert-base-uncased` with `[DEC]` as the
bos token and `[ENC]` added (models/BLIP/blip.py:16-21), padded to and truncated at 35 tokens (ImageReward.py:110),
its first token left as [CLS]. The text encoder attends to every image token (all-ones image mask,
ImageReward.py:124-130), bidirectionally over the prompt.

Weights: `ImageReward.pt` and `med_config.json` in the hub repository `THUDM/ImageReward` (ImageReward/utils.py:28,
41, 76), a plain state dict read here with `torch.load(weights_only=True)` (or a `.safetensors` file of the same
tensors). Architecture: BLIP's ViT-L (models/BLIP/blip.py:32-37: width 1024, 24 layers, 16 heads, patch 16 at 224
px; vit.py:138: LayerNorm eps 1e-6; head width 64 as in both of BLIP's ViTs) read from the tensors' shapes; the
text encoder from `med_config.json` (BERT-base: 12 layers, 12 heads, 768 wide, LayerNorm eps 1e-12, vocabulary
30524) with cross-attention key/value width set to the ViT's (models/BLIP/blip_pretrain.py:35-37).

The BLIP modules are transformers' `BlipVisionModel` and `BlipTextModel` (BLIP's own med.py ported, so the text
encoder's names match as they are); the renaming, in our code:

    blip.visual_encoder.cls_token / pos_embed           -> vision.embeddings.class_embedding / position_embedding
    blip.visual_encoder.patch_embed.proj                -> vision.embeddings.patch_embedding
    blip.visual_encoder.blocks.N.norm1 / norm2          -> vision.encoder.layers.N.layer_norm1 / layer_norm2
    blip.visual_encoder.blocks.N.attn.qkv / attn.proj   -> vision.encoder.layers.N.self_attn.qkv / .projection
    blip.visual_encoder.blocks.N.mlp.fc1 / fc2          -> vision.encoder.layers.N.mlp.fc1 / fc2
    blip.visual_encoder.norm                            -> vision.post_layernorm
    blip.text_encoder.X                                 -> text.X (embeddings.position_ids, a constant, dropped)
    mlp.layers.{0,2,4,6,7}                              -> the MLP's layers
    blip.vision_proj, blip.text_proj                    -> unused (BLIP's contrastive heads; the score ignores them)

Cost: ViT-L/16 (~303M parameters) and BERT-base with cross-attention (~140M): about 1.8 GB in float32, 0.9 GB in
float16; one image and one text forward pass per sample.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import ddpo
from ddpo.core.configuration.errors import UsageError

MEAN, STD = 0.16717362830052426, 1.0333394966054072
"""The raw scores' mean and std over ImageReward's data (ImageReward.py:80-81): the reward is standardised by them."""
MAX_PROMPT_TOKENS = 35
"""The tokenizer's padding and truncation length (ImageReward.py:110)."""
VISION_HEAD_WIDTH = 64
"""BLIP's ViTs: 768 / 12 heads (base), 1024 / 16 heads (large, ImageReward's)."""
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

_VISION_NAMES = [(r"^cls_token$", "embeddings.class_embedding"),
                 (r"^pos_embed$", "embeddings.position_embedding"),
                 (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
                 (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
                 (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
                 (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
                 (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
                 (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
                 (r"^norm\.", "post_layernorm.")]


def split_checkpoint(state: dict) -> tuple[dict, dict, dict]:
    """ImageReward.pt's tensors as the state dicts of transformers' `BlipVisionModel`, `BlipTextModel` and the MLP
    (the table in the module docstring). A key under `blip.visual_encoder.` outside the table is a UsageError."""
    vision, text, mlp = {}, {}, {}
    for key, tensor in state.items():
        if key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            for pattern, replacement in _VISION_NAMES:
                if re.match(pattern, name):
                    vision[re.sub(pattern, replacement, name)] = tensor
                    break
            else:
                raise UsageError(f"unexpected key {key} in the ImageReward checkpoint: not BLIP's ViT")
        elif key.startswith("blip.text_encoder.") and not key.endswith("embeddings.position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = tensor
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.")] = tensor
    return vision, text, mlp


def _shape(state: dict, key: str, source) -> tuple[int, ...]:
    if key not in state:
        raise UsageError(f"{source} has no {key}: not an ImageReward checkpoint")
    return tuple(state[key].shape)


def blip_configs(state: dict, med_config: dict, tokenizer, source):
    """transformers' `BlipVisionConfig` (sizes from the ViT's tensor shapes) and `BlipTextConfig` (from
    `med_config.json`, cross-attending to the ViT's width, special tokens from BLIP's `tokenizer`) of an ImageReward
    checkpoint."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch_size, _ = _shape(state, "blip.visual_encoder.patch_embed.proj.weight", source)
    grid = round((_shape(state, "blip.visual_encoder.pos_embed", source)[1] - 1) ** 0.5)
    layers = len({key.split(".")[3] for key in state if key.startswith("blip.visual_encoder.blocks.")})
    vision = BlipVisionConfig(
        hidden_size=width, num_attention_heads=width // VISION_HEAD_WIDTH, num_hidden_layers=layers,
        intermediate_size=_shape(state, "blip.visual_encoder.blocks.0.mlp.fc1.weight", source)[0],
        patch_size=patch_size, image_size=grid * patch_size, hidden_act="gelu", layer_norm_eps=1e-6)
    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")
    missing = [field for field in fields if field not in med_config]
    if missing:
        raise UsageError(f"the ImageReward med_config.json has no {missing[0]}")
    text = BlipTextConfig(**{field: med_config[field] for field in fields}, encoder_hidden_size=width,
                          bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                          is_decoder=True)  # is_decoder builds the cross-attention layers; the forward is bidirectional
    return vision, text


def _load_strictly(module, state: dict, source, part: str) -> None:
    result = module.load_state_dict(state, strict=False, assign=True)
    problems = [f"lacks {key}" for key in result.missing_keys if not key.endswith("position_ids")]
    problems += [f"has an unexpected {key}" for key in result.unexpected_keys]
    if problems:
        raise UsageError(f"{source}: its {part} {problems[0]} ({len(problems)} such keys)")


class ImageReward(ddpo.Reward):
    """ImageReward: a BLIP fine-tuned on human preferences, standardised score (about -2 to 2)."""

    name = "imagereward"

    class Options(ddpo.Options):
        pretrained: str = "THUDM/ImageReward"
        """A hub repository id or a local directory holding `filename` and med_config.json (or the weights file,
        with med_config.json beside it)."""
        filename: str = "ImageReward.pt"
        """The checkpoint's file name: .pt (read weights-only) or .safetensors."""
        tokenizer: str = "bert-base-uncased"
        """BLIP's tokenizer before its two added tokens: a hub id or a local directory."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the BLIP weights (auto: float16 on CUDA, else float32); the MLP always runs in float32."""

    def load(self, device):
        import transformers
        from accelerate import init_empty_weights
        from transformers import BlipTextModel, BlipVisionModel

        from ddpo.plugins.rewards.aesthetic import build_aesthetic_mlp, load_state_dict
        from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor, resolve_dtype
        from ddpo.plugins.rewards.weights import pretrained_file

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.options.tokenizer)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"reward.tokenizer={self.options.tokenizer}: cannot load a tokenizer from it ({reason})") \
                from None
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        path = pretrained_file(self.options.pretrained, self.options.filename, "pretrained")
        config_source = str(Path(self.options.pretrained).parent) if Path(self.options.pretrained).is_file() \
            else self.options.pretrained
        config_path = pretrained_file(config_source, "med_config.json", "pretrained")
        try:
            med_config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read {config_path} as JSON ({error})") from None
        state = load_state_dict(path)
        vision_config, text_config = blip_configs(state, med_config, self.tokenizer, path)
        if len(self.tokenizer) > text_config.vocab_size:
            raise UsageError(f"reward.tokenizer={self.options.tokenizer} has {len(self.tokenizer)} tokens with BLIP's "
                             f"two added, more than the checkpoint's vocabulary of {text_config.vocab_size}")
        vision_state, text_state, mlp_state = split_checkpoint(state)
        dtype = resolve_dtype(self.options.dtype, device)
        with init_empty_weights():  # parameters on the meta device until the checkpoint's tensors are assigned
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        _load_strictly(self.vision, vision_state, path, "image encoder")
        _load_strictly(self.text, text_state, path, "text encoder")
        self.mlp = build_aesthetic_mlp(text_config.hidden_size)
        _load_strictly(self.mlp, mlp_state, path, "MLP head")
        self.vision.to(device, dtype).eval()
        self.text.to(device, dtype).eval()
        self.mlp.to(device).eval()
        size = {"shortest_edge": vision_config.image_size}  # 224 for ImageReward.pt (ImageReward.py:76-77)
        crop = {"height": vision_config.image_size, "width": vision_config.image_size}
        self.preprocess = ClipImagePreprocessor(SimpleNamespace(size=size, crop_size=crop, image_mean=OPENAI_MEAN,
                                                                image_std=OPENAI_STD))
        self.device = device

    def __call__(self, images, prompts, metadata):
        import torch

        with torch.no_grad():
            parameter = next(self.vision.parameters())
            pixel_values = self.preprocess(images.to(parameter.device)).to(parameter.dtype)
            image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
            tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                    max_length=MAX_PROMPT_TOKENS, return_tensors="pt").to(self.device)
            features = self.text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                                 encoder_hidden_states=image_embeds, is_decoder=False).last_hidden_state[:, 0]
            return ((self.mlp(features.float()) - MEAN) / STD).squeeze(1)


@ddpo.hookimpl
def register_rewards(register):
    register(ImageReward)
