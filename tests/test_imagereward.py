"""The `imagereward` reward on a tiny random checkpoint saved under ImageReward.pt's public key names: its score is
BLIP's ViT, the cross-attending BERT and the MLP head written out here in float64 from the raw tensors, standardised
by ImageReward's mean and std; the contract holds, loading is weights-only, and bad weights are one-line errors."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

from ddpo.core.configuration.errors import UsageError
from ddpo.plugins.rewards.imagereward import ImageReward
from ddpo.testing import build_tiny_imagereward, check_reward
from tests.helpers import once_per_session

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a red dog riding a bike", "two horses in a field at night"]
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    return once_per_session(tmp_path_factory, "tiny-imagereward", build_tiny_imagereward)


@pytest.fixture(scope="module")
def reward(tiny_imagereward):
    loaded = ImageReward({"pretrained": str(tiny_imagereward), "tokenizer": str(tiny_imagereward)})
    loaded.load(CPU)
    return loaded


def linear(x, state, prefix):
    return x @ state[f"{prefix}.weight"].T + state[f"{prefix}.bias"]


def layer_norm(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=eps)


def attention(q, k, v, heads, key_mask=None):
    """Multi-head scaled dot-product attention; key_mask (B, Lk) of 0/1 hides the keys at 0."""
    batch, length, width = q.shape
    head_width = width // heads
    q, k, v = (t.reshape(batch, -1, heads, head_width).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / head_width ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, width)


def blip_vit(state, pixels):
    """BLIP's ViT (vision transformer with pre-LayerNorm blocks, eps 1e-6, heads of 64), all its output tokens."""
    p = "blip.visual_encoder"
    weight = state[f"{p}.patch_embed.proj.weight"]
    x = F.conv2d(pixels, weight, state[f"{p}.patch_embed.proj.bias"], stride=weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{p}.cls_token"].expand(len(x), 1, -1), x], dim=1) + state[f"{p}.pos_embed"]
    heads = x.shape[-1] // 64
    for index in range(len({key.split(".")[3] for key in state if key.startswith(f"{p}.blocks.")})):
        block = f"{p}.blocks.{index}"
        q, k, v = linear(layer_norm(x, state, f"{block}.norm1", 1e-6), state, f"{block}.attn.qkv").chunk(3, -1)
        x = x + linear(attention(q, k, v, heads), state, f"{block}.attn.proj")
        h = F.gelu(linear(layer_norm(x, state, f"{block}.norm2", 1e-6), state, f"{block}.mlp.fc1"))
        x = x + linear(h, state, f"{block}.mlp.fc2")
    return layer_norm(x, state, f"{p}.norm", 1e-6)


def blip_bert_cls(state, config, token_ids, mask, image_tokens):
    """BLIP's BERT (post-LayerNorm, eps 1e-12): self-attention over the unpadded prompt, cross-attention to every
    image token, GELU feed-forward; the [CLS] position's output."""
    p, heads = "blip.text_encoder", config["num_attention_heads"]
    x = state[f"{p}.embeddings.word_embeddings.weight"][token_ids]
    x = layer_norm(x + state[f"{p}.embeddings.position_embeddings.weight"][:token_ids.shape[1]], state,
                   f"{p}.embeddings.LayerNorm", 1e-12)
    for index in range(config["num_hidden_layers"]):
        layer = f"{p}.encoder.layer.{index}"
        for part, keys, key_mask in (("attention", x, mask), ("crossattention", image_tokens, None)):
            att = f"{layer}.{part}"
            mixed = attention(linear(x, state, f"{att}.self.query"), linear(keys, state, f"{att}.self.key"),
                              linear(keys, state, f"{att}.self.value"), heads, key_mask)
            x = layer_norm(x + linear(mixed, state, f"{att}.output.dense"), state, f"{att}.output.LayerNorm", 1e-12)
        h = linear(F.gelu(linear(x, state, f"{layer}.intermediate.dense")), state, f"{layer}.output.dense")
        x = layer_norm(x + h, state, f"{layer}.output.LayerNorm", 1e-12)
    return x[:, 0]


def imagereward_by_hand(directory, images, token_ids, mask):
    """(MLP(CLS feature) - mean) / std in float64, images (B, 3, 32, 32) at the model's size (preprocessing is the
    normalisation alone)."""
    state = {key: value.double() for key, value in torch.load(directory / "ImageReward.pt", weights_only=True).items()}
    config = json.loads((directory / "med_config.json").read_text())
    image_tokens = blip_vit(state, (images.double() - OPENAI_MEAN) / OPENAI_STD)
    x = blip_bert_cls(state, config, token_ids, mask, image_tokens)
    for index in (0, 2, 4, 6, 7):
        x = linear(x, state, f"mlp.layers.{index}")
    return (x.squeeze(1) - 0.16717362830052426) / 1.0333394966054072


def test_score_is_blip_and_the_mlp_computed_by_hand(reward, tiny_imagereward):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rewards = reward(images, PROMPTS, [{}] * 3)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (3, 35) and (tokens["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    expected = imagereward_by_hand(tiny_imagereward, images, tokens["input_ids"], tokens["attention_mask"])
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert expected.max() - expected.min() > 0.1  # image and prompt both matter
    swapped = reward(images.flip(0), PROMPTS, [{}] * 3)
    assert (swapped - rewards).abs().max() > 1e-3  # the same prompts on other images score otherwise


def test_long_prompts_are_cut_at_35_tokens_and_the_tokenizer_gains_blips_tokens(reward):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    long_prompt = "a cat " * 30
    rewards = reward(images, [long_prompt, long_prompt + "and more words"], [{}] * 2)
    assert rewards[0] != rewards[1]  # different images ...
    same_images = reward(images[:1].expand(2, -1, -1, -1), [long_prompt, long_prompt + "and more words"], [{}] * 2)
    assert same_images[0] == pytest.approx(float(same_images[1]), abs=1e-6)  # ... but the tail is cut off
    assert reward.tokenizer.bos_token == "[DEC]" and "[ENC]" in reward.tokenizer.all_special_tokens
    assert reward.tokenizer.tokenize("a [ENC] b [DEC]") == ["a", "[ENC]", "b", "[DEC]"]


def test_check_reward_passes(tiny_imagereward):
    check_reward(ImageReward, {"pretrained": str(tiny_imagereward), "tokenizer": str(tiny_imagereward)})


def test_weights_file_with_med_config_beside_it_and_safetensors(tiny_imagereward, reward, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "ir.safetensors")
    (tmp_path / "med_config.json").write_text((tiny_imagereward / "med_config.json").read_text())
    other = ImageReward({"pretrained": str(tmp_path / "ir.safetensors"), "tokenizer": str(tiny_imagereward)})
    other.load(CPU)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3))  # resized and cropped to 32
    assert other(images, PROMPTS[:2], [{}] * 2).tolist() == pytest.approx(
        reward(images, PROMPTS[:2], [{}] * 2).tolist(), abs=1e-6)


def test_errors_are_one_line_usage_errors(tiny_imagereward, tmp_path):
    state = torch.load(tiny_imagereward / "ImageReward.pt", weights_only=True)
    config = (tiny_imagereward / "med_config.json").read_text()
    for name, broken in (("extra", {**state, "blip.visual_encoder.head.weight": torch.zeros(1)}),
                         ("short", {k: v for k, v in state.items() if k != "mlp.layers.7.bias"}),
                         ("text", {k: v for k, v in state.items() if "crossattention" not in k})):
        (tmp_path / name).mkdir()
        torch.save(broken, tmp_path / name / "ImageReward.pt")
        (tmp_path / name / "med_config.json").write_text(config)
    (tmp_path / "no-config").mkdir()
    torch.save(state, tmp_path / "no-config" / "ImageReward.pt")
    cases = [({"pretrained": str(tmp_path / "no-config")},
              f"reward.pretrained={tmp_path / 'no-config'} holds no med_config.json"),
             ({"pretrained": str(tmp_path / "extra")}, "unexpected key blip.visual_encoder.head.weight"),
             ({"pretrained": str(tmp_path / "short")}, "its MLP head lacks layers.7.bias"),
             ({"pretrained": str(tmp_path / "text")}, "its text encoder lacks encoder.layer.0.crossattention"),
             ({"tokenizer": str(tmp_path / "no-config")}, f"reward.tokenizer={tmp_path / 'no-config'}: cannot load")]
    for options, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)) as error:
            ImageReward({"pretrained": str(tiny_imagereward), "tokenizer": str(tiny_imagereward), **options}).load(CPU)
        assert "\n" not in str(error.value)


def test_registered_as_a_reward():
    from ddpo.core.plugin_api.registry import get_registry

    assert get_registry().get("rewards", "imagereward") is ImageReward


def test_imagereward_checkpoint_layout_maps_onto_blip_exactly():
    """ImageReward.pt's keys and shapes (BLIP ViT-L/16 at 224: 1024 wide, 24 layers; BERT-base with cross-attention
    from THUDM/ImageReward's med_config.json), as meta tensors: the configs read from them are ViT-L's and
    BERT-base's, and every tensor lands on a weight of BlipVisionModel, BlipTextModel or the MLP, shape for shape."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from transformers import BlipTextModel, BlipVisionModel

    from ddpo.plugins.rewards.imagereward import blip_configs, split_checkpoint

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    def linear(prefix, out_features, in_features):
        return {f"{prefix}.weight": meta(out_features, in_features), f"{prefix}.bias": meta(out_features)}

    def norm(prefix, width):
        return {f"{prefix}.weight": meta(width), f"{prefix}.bias": meta(width)}

    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    state = {f"{vit}.cls_token": meta(1, 1, 1024), f"{vit}.pos_embed": meta(1, 197, 1024),
             f"{vit}.patch_embed.proj.weight": meta(1024, 3, 16, 16), f"{vit}.patch_embed.proj.bias": meta(1024),
             **norm(f"{vit}.norm", 1024), f"{bert}.embeddings.word_embeddings.weight": meta(30524, 768),
             f"{bert}.embeddings.position_embeddings.weight": meta(512, 768),
             f"{bert}.embeddings.position_ids": meta(1, 512), **norm(f"{bert}.embeddings.LayerNorm", 768),
             **linear("blip.vision_proj", 256, 1024), **linear("blip.text_proj", 256, 768)}
    for index in range(24):
        block = f"{vit}.blocks.{index}"
        state.update({**norm(f"{block}.norm1", 1024), **linear(f"{block}.attn.qkv", 3072, 1024),
                      **linear(f"{block}.attn.proj", 1024, 1024), **norm(f"{block}.norm2", 1024),
                      **linear(f"{block}.mlp.fc1", 4096, 1024), **linear(f"{block}.mlp.fc2", 1024, 4096)})
    for index in range(12):
        layer = f"{bert}.encoder.layer.{index}"
        for part, key_width in (("attention", 768), ("crossattention", 1024)):
            state.update({**linear(f"{layer}.{part}.self.query", 768, 768),
                          **linear(f"{layer}.{part}.self.key", 768, key_width),
                          **linear(f"{layer}.{part}.self.value", 768, key_width),
                          **linear(f"{layer}.{part}.output.dense", 768, 768),
                          **norm(f"{layer}.{part}.output.LayerNorm", 768)})
        state.update({**linear(f"{layer}.intermediate.dense", 3072, 768), **linear(f"{layer}.output.dense", 768, 3072),
                      **norm(f"{layer}.output.LayerNorm", 768)})
    for index, shape in zip((0, 2, 4, 6, 7), ((1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16))):
        state.update(linear(f"mlp.layers.{index}", *shape))
    med_config = {"hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
                  "max_position_embeddings": 512, "num_attention_heads": 12, "num_hidden_layers": 12,
                  "pad_token_id": 0, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
    vision, text = blip_configs(state, med_config, SimpleNamespace(bos_token_id=30522, sep_token_id=102), "x")
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size, vision.layer_norm_eps) == (1024, 24, 16, 16, 224, 1e-6)
    assert (text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size, text.vocab_size) == \
        (768, 12, 1024, 30524)
    vision_state, text_state, mlp_state = split_checkpoint(state)
    assert len(vision_state) + len(text_state) + len(mlp_state) == len(state) - 5  # position_ids and the two heads
    with init_empty_weights():
        for module, part in ((BlipVisionModel(vision), vision_state), (BlipTextModel(text, add_pooling_layer=False),
                                                                       text_state)):
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
            assert {k: tuple(v.shape) for k, v in part.items()} == expected
    assert sorted(mlp_state) == sorted(f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias"))
