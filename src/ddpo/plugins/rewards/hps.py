"""`hps`: Human Preference Score v2 / v2.1 (Wu et al., 2023, "Human Preference Score v2: A Solid Benchmark for
Evaluating Human Preferences of Text-to-Image Synthesis", arXiv 2306.09341; official code tgxs002/HPSv2). An
open_clip ViT-H-14 (laion2B-s32B-b79K) fine-tuned on 798k human choices between generated images; DanceGRPO's
default reward (SD 1.4 HPS-v2.1 0.24 -> 0.37 in 300 iterations).

    s = scale * cos(E_img(x), E_txt(prompt))        E: the projected CLIP embeddings (1024-d)

HPSv2's scoring API returns the cosine itself (hpsv2/img_score.py:79, `image_features @ text_features.T` of
features L2-normalised in open_clip's model.py:247-248; no logit scale), so `scale` defaults to 1: DanceGRPO's
rewards (fastvideo/train_grpo_flux.py:397-398) and the 0.2-0.4 figures papers report. The HPSv2 benchmark tables
multiply by 100 (hpsv2/evaluation.py:141): `scale: 100` gives those numbers.

Weights: `HPS_v2.1_compressed.pt` (v2.0: `HPS_v2_compressed.pt`) in the hub repository `xswu/HPSv2`
(hpsv2/utils.py:14-17, img_score.py:52), a dict {"state_dict": open_clip state dict} (img_score.py:55), read here
with `torch.load(weights_only=True)` (no pickled code) or from a `.safetensors` file holding the state dict. The
architecture is open_clip's ViT-H-14.json: vision width 1280, 32 layers, head width 80, patch 14 at 224 px; text
width 1024, 24 layers, 16 heads (head width 64), 77 tokens, embedding 1024; exact GELU (`force_quick_gelu=False`,
img_score.py:26), LayerNorm eps 1e-5. Every width, depth and size is read from the tensors' shapes; the head
widths are the constants below.

No open_clip here (it needs torchvision): the weights are renamed onto transformers' `CLIPModel`, which computes
the same function (pre-LayerNorm on the vision side, class-token pooling, causal text attention pooled at the
end-of-text token, projections without bias):

    visual.conv1.weight                         -> vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                      -> vision_model.embeddings.class_embedding
    visual.positional_embedding                 -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post              -> vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.proj (W, E)                          -> visual_projection.weight, transposed
    token_embedding / positional_embedding      -> text_model.embeddings.token_embedding / .position_embedding
    ln_final                                    -> text_model.final_layer_norm
    text_projection (W, E)                      -> text_projection.weight, transposed
    logit_scale                                 -> logit_scale
    [visual.]transformer.resblocks.N.           -> {vision,text}_model.encoder.layers.N.
        ln_1 / ln_2                             -> layer_norm1 / layer_norm2
        attn.in_proj_weight, attn.in_proj_bias  -> self_attn.{q,k,v}_proj.{weight,bias} (thirds, in that order)
        attn.out_proj                           -> self_attn.out_proj
        mlp.c_fc / mlp.c_proj                   -> mlp.fc1 / mlp.fc2

Preprocessing is open_clip's validation transform (open_clip/transform.py:141-157): bicubic resize of the shortest
side to 224, centre crop, OpenAI's mean and std (constants.py); prompts are tokenized by CLIP's BPE, 77 tokens
with start and end of text. Both come from `processor`, the laion ViT-H-14 repository's tokenizer and image
processor config, which hold the same values.

Cost: ViT-H-14, about 986M parameters: 3.9 GB in float32, 2 GB in float16; one image and one text forward pass per
sample.
"""

from __future__ import annotations

import re
from typing import Literal

import ddpo
from ddpo.core.configuration.errors import UsageError

VISION_HEAD_WIDTH = 80
"""open_clip's ViT-H-14.json `head_width` (1280 / 80 = 16 heads)."""
TEXT_HEAD_WIDTH = 64
"""ViT-H-14.json's text tower: width 1024, 16 heads."""

_TOP_LEVEL_NAMES = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED_NAMES = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)$")


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip CLIP state dict renamed onto transformers' `CLIPModel` (the table in the module docstring): the
    fused attention input projection is split into its query, key and value thirds and the two projection matrices
    are transposed. A key outside that table is a UsageError naming it."""
    renamed = {}
    for key, tensor in state.items():
        if key in _TOP_LEVEL_NAMES:
            renamed[_TOP_LEVEL_NAMES[key]] = tensor
        elif key in _TRANSPOSED_NAMES:
            renamed[_TRANSPOSED_NAMES[key]] = tensor.t().contiguous()
        elif match := _BLOCK_KEY.match(key):
            vision, index, module, kind = match.groups()
            prefix = f"{'vision' if vision else 'text'}_model.encoder.layers.{index}."
            if module == "attn.in_proj":
                for name, third in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    renamed[f"{prefix}self_attn.{name}.{kind}"] = third.contiguous()
            elif module in _BLOCK_NAMES:
                renamed[f"{prefix}{_BLOCK_NAMES[module]}.{kind}"] = tensor
            else:
                raise UsageError(f"unexpected key {key} in the HPS checkpoint: not an open_clip ViT CLIP state dict")
        else:
            raise UsageError(f"unexpected key {key} in the HPS checkpoint: not an open_clip ViT CLIP state dict")
    return renamed


def _shape(state: dict, key: str) -> tuple[int, ...]:
    if key not in state:
        raise UsageError(f"the HPS checkpoint has no {key}: not an open_clip ViT CLIP state dict")
    return tuple(state[key].shape)


def _layer_count(state: dict, prefix: str) -> int:
    return len({key.split(".")[len(prefix.split(".")) - 1] for key in state if key.startswith(prefix)})


def clip_config_from_open_clip(state: dict, tokenizer):
    """transformers' `CLIPConfig` of an open_clip ViT CLIP state dict: sizes from the tensors' shapes, head counts
    from the head widths, special tokens from `tokenizer` (the text tower pools at its end-of-text token)."""
    from transformers import CLIPConfig

    vision_width, _, patch_size, _ = _shape(state, "visual.conv1.weight")
    grid = round((_shape(state, "visual.positional_embedding")[0] - 1) ** 0.5)
    projection_dim = _shape(state, "visual.proj")[1]
    vocab_size, text_width = _shape(state, "token_embedding.weight")
    if _shape(state, "text_projection") != (text_width, projection_dim):
        raise UsageError(f"the HPS checkpoint's text_projection is {_shape(state, 'text_projection')}, expected "
                         f"({text_width}, {projection_dim}) to match visual.proj")
    vision_config = dict(
        hidden_size=vision_width, num_attention_heads=vision_width // VISION_HEAD_WIDTH, patch_size=patch_size,
        image_size=grid * patch_size, num_hidden_layers=_layer_count(state, "visual.transformer.resblocks."),
        intermediate_size=_shape(state, "visual.transformer.resblocks.0.mlp.c_fc.weight")[0], hidden_act="gelu",
        layer_norm_eps=1e-5, projection_dim=projection_dim)
    text_config = dict(
        vocab_size=vocab_size, hidden_size=text_width, num_attention_heads=text_width // TEXT_HEAD_WIDTH,
        num_hidden_layers=_layer_count(state, "transformer.resblocks."),
        intermediate_size=_shape(state, "transformer.resblocks.0.mlp.c_fc.weight")[0],
        max_position_embeddings=_shape(state, "positional_embedding")[0], hidden_act="gelu", layer_norm_eps=1e-5,
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)


def load_hps_clip(path, tokenizer):
    """transformers' `CLIPModel` holding the open_clip weights of the HPS checkpoint at `path` (on the CPU, in the
    file's dtype)."""
    from accelerate import init_empty_weights
    from transformers import CLIPModel

    from ddpo.plugins.rewards.aesthetic import load_state_dict

    state = load_state_dict(path)
    state = state.get("state_dict", state)
    with init_empty_weights():  # parameters on the meta device: no random init of ~1B weights, no second copy
        model = CLIPModel(clip_config_from_open_clip(state, tokenizer))
    result = model.load_state_dict(open_clip_to_transformers(state), strict=False, assign=True)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing:
        raise UsageError(f"the HPS checkpoint {path} lacks weights for {missing[0]} (and {len(missing) - 1} more)")
    return model


class Hps(ddpo.Reward):
    """HPSv2.1: cosine of a human-preference-tuned CLIP ViT-H-14's image and prompt embeddings (x `scale`)."""

    name = "hps"

    class Options(ddpo.Options):
        pretrained: str = "xswu/HPSv2"
        """Where the checkpoint is: a hub repository id, a local directory holding `filename`, or the file itself."""
        filename: str = "HPS_v2.1_compressed.pt"
        """The checkpoint's file name (`HPS_v2_compressed.pt`: HPSv2.0); .pt (read weights-only) or .safetensors."""
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
        """Where the tokenizer and image preprocessing come from: a hub id or a local directory."""
        scale: float = 1.0
        """Multiplies the cosine: 1 as HPSv2's `score` API and DanceGRPO, 100 as the HPSv2 benchmark tables."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the CLIP weights (auto: float16 on CUDA, else float32)."""

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor, resolve_dtype
        from ddpo.plugins.rewards.weights import pretrained_file

        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.options.processor)
            self.preprocess = ClipImagePreprocessor.from_pretrained(self.options.processor)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"reward.processor={self.options.processor}: cannot load a CLIP tokenizer and image "
                             f"processor from it ({reason})") from None
        path = pretrained_file(self.options.pretrained, self.options.filename, "pretrained")
        self.model = load_hps_clip(path, self.tokenizer).to(device, resolve_dtype(self.options.dtype, device)).eval()
        self.device = device

    def __call__(self, images, prompts, metadata):
        import torch
        import torch.nn.functional as F

        from ddpo.plugins.rewards.clip_preprocessing import clip_image_embeddings, clip_text_embeddings

        with torch.no_grad():
            image = F.normalize(clip_image_embeddings(self.model, self.preprocess, images), dim=-1)
            text = F.normalize(clip_text_embeddings(self.model, self.tokenizer, prompts, self.device), dim=-1)
        return self.options.scale * (image * text).sum(dim=-1)


@ddpo.hookimpl
def register_rewards(register):
    register(Hps)
