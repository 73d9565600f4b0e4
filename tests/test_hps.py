"""The `hps` reward on a tiny random open_clip checkpoint saved under HPSv2.1's public key names: its score is the
cosine of an open_clip forward pass written out here in float64 from the raw tensors (so the renaming onto
transformers' CLIPModel is checked, not assumed), the contract holds, loading is weights-only, and bad weights are
one-line errors (exit 2 from the CLI)."""

import re

import pytest
import torch
import torch.nn.functional as F

from ddpo.core.configuration.errors import UsageError
from ddpo.plugins.rewards.hps import Hps
from ddpo.testing import build_tiny_hps, check_reward
from tests.helpers import once_per_session

CPU = torch.device("cpu")
PROMPTS = ["a cat", "a red dog riding a bike", "two horses"]
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    return once_per_session(tmp_path_factory, "tiny-hps", build_tiny_hps)


@pytest.fixture(scope="module")
def hps(tiny_hps):
    reward = Hps({"pretrained": str(tiny_hps), "processor": str(tiny_hps)})
    reward.load(CPU)
    return reward


def open_clip_state(directory):
    return {key: value.double() for key, value in
            torch.load(directory / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"].items()}


def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def resblocks(x, state, prefix, head_width, causal):
    """open_clip's pre-LayerNorm residual attention blocks, by hand: fused q/k/v, exact GELU, 4x MLP."""
    layers = len({key.split(".")[len(prefix.split("."))] for key in state if key.startswith(prefix + ".")})
    length, width = x.shape[1:]
    heads = width // head_width
    mask = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1) if causal else 0
    for index in range(layers):
        block = f"{prefix}.{index}"
        h = layer_norm(x, state, f"{block}.ln_1")
        q, k, v = (h @ state[f"{block}.attn.in_proj_weight"].T + state[f"{block}.attn.in_proj_bias"]).chunk(3, -1)
        q, k, v = (t.reshape(len(x), length, heads, head_width).transpose(1, 2) for t in (q, k, v))
        attention = (q @ k.transpose(-1, -2) / head_width ** 0.5 + mask).softmax(-1) @ v
        attention = attention.transpose(1, 2).reshape(len(x), length, width)
        x = x + attention @ state[f"{block}.attn.out_proj.weight"].T + state[f"{block}.attn.out_proj.bias"]
        h = layer_norm(x, state, f"{block}.ln_2")
        h = F.gelu(h @ state[f"{block}.mlp.c_fc.weight"].T + state[f"{block}.mlp.c_fc.bias"])
        x = x + h @ state[f"{block}.mlp.c_proj.weight"].T + state[f"{block}.mlp.c_proj.bias"]
    return x


def open_clip_score(state, images, token_ids):
    """cos(image, text) of open_clip's CLIP forward in float64: images (B, 3, 32, 32) in [0, 1] at the model's
    size (so preprocessing is the normalisation alone), token_ids padded with 0 to 77 (open_clip's tokenize)."""
    pixels = (images.double() - OPENAI_MEAN) / OPENAI_STD
    weight = state["visual.conv1.weight"]
    x = F.conv2d(pixels, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1)
    x = x + state["visual.positional_embedding"]
    x = resblocks(layer_norm(x, state, "visual.ln_pre"), state, "visual.transformer.resblocks", 80, causal=False)
    image = layer_norm(x[:, 0], state, "visual.ln_post") @ state["visual.proj"]
    x = state["token_embedding.weight"][token_ids] + state["positional_embedding"]
    x = layer_norm(resblocks(x, state, "transformer.resblocks", 64, causal=True), state, "ln_final")
    text = x[torch.arange(len(x)), token_ids.argmax(-1)] @ state["text_projection"]  # at the end-of-text token
    return F.cosine_similarity(image, text, dim=-1)


def padded_token_ids(tokenizer, prompts):
    ids = torch.zeros(len(prompts), 77, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens = tokenizer(prompt)["input_ids"]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    return ids


def test_score_is_the_open_clip_cosine_computed_by_hand(hps, tiny_hps):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rewards = hps(images, PROMPTS, [{}] * 3)
    expected = open_clip_score(open_clip_state(tiny_hps), images, padded_token_ids(hps.tokenizer, PROMPTS))
    assert rewards.dtype == torch.float32 and rewards.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert expected.max() - expected.min() > 0.05  # image and prompt both matter
    one_by_one = torch.cat([hps(images[i:i + 1], PROMPTS[i:i + 1], [{}]) for i in range(3)])
    assert torch.allclose(rewards, one_by_one, atol=1e-6)  # batching (text padding) changes nothing


def test_scale_multiplies_the_cosine_and_safetensors_load_the_same(tiny_hps, hps, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(tiny_hps / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    save_file(state, tmp_path / "hps.safetensors")
    reward = Hps({"pretrained": str(tmp_path / "hps.safetensors"), "processor": str(tiny_hps), "scale": 100})
    reward.load(CPU)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert reward(images, PROMPTS[:2], [{}] * 2).tolist() == pytest.approx(
        (100 * hps(images, PROMPTS[:2], [{}] * 2)).tolist(), abs=1e-4)


def test_check_reward_passes(tiny_hps):
    rewards = check_reward(Hps, {"pretrained": str(tiny_hps), "processor": str(tiny_hps)})
    assert ((rewards > -1) & (rewards < 1)).all()


def test_errors_are_one_line_usage_errors(tiny_hps, tmp_path, monkeypatch):
    import huggingface_hub.constants

    state = torch.load(tiny_hps / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    torch.save({"state_dict": {**state, "visual.attn_pool.query": torch.zeros(2)}}, tmp_path / "extra.pt")
    torch.save({"state_dict": {k: v for k, v in state.items() if k != "ln_final.bias"}}, tmp_path / "short.pt")
    torch.save({"state_dict": state, "args": re.compile("x")}, tmp_path / "pickled.pt")  # not weights-only
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [({"pretrained": str(tmp_path / "empty")}, f"reward.pretrained={tmp_path / 'empty'} holds no "
                                                        "HPS_v2.1_compressed.pt"),
             ({"pretrained": "./no/such/dir"}, "reward.pretrained=./no/such/dir is neither a local file or directory"),
             ({"pretrained": "someone/not-cached-hps"}, "reward.pretrained=someone/not-cached-hps: cannot get "
                                                        "HPS_v2.1_compressed.pt from the Hugging Face hub"),
             ({"pretrained": str(tmp_path / "extra.pt")},
              "unexpected key visual.attn_pool.query in the HPS checkpoint"),
             ({"pretrained": str(tmp_path / "short.pt")}, "lacks weights for text_model.final_layer_norm.bias"),
             ({"pretrained": str(tmp_path / "pickled.pt")}, "as a weights-only torch file"),
             ({"processor": str(tmp_path / "empty")}, f"reward.processor={tmp_path / 'empty'}: cannot load a CLIP")]
    for options, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)) as error:
            Hps({"pretrained": str(tiny_hps), "processor": str(tiny_hps), **options}).load(CPU)
        assert "\n" not in str(error.value)


def test_missing_weights_exit_2_from_the_cli(forked_cli, tiny_hps, tmp_path):
    result = forked_cli.run("run", "--reward", "hps", "--set", f"reward.pretrained={tmp_path}", "--set",
                            f"reward.processor={tiny_hps}", "--epochs", "1", "--logdir", str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"reward.pretrained={tmp_path} holds no HPS_v2.1_compressed.pt" in result.stderr
    assert "Traceback" not in result.stderr


def test_registered_as_a_reward():
    from ddpo.core.plugin_api.registry import get_registry

    assert get_registry().get("rewards", "hps") is Hps


def test_hpsv2_checkpoint_layout_maps_onto_clip_vit_h_14_exactly():
    """HPS_v2.1_compressed.pt's keys and shapes (open_clip ViT-H-14: vision 1280 wide, 32 layers, patch 14 at 224;
    text 1024 wide, 24 layers, 77 tokens; embeddings 1024), as meta tensors: the config read from them is
    ViT-H-14's, and the renamed keys are exactly CLIPModel's, shape for shape."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from transformers import CLIPModel

    from ddpo.plugins.rewards.hps import clip_config_from_open_clip, open_clip_to_transformers

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    def blocks(prefix, width, layers):
        state = {}
        for index in range(layers):
            block = f"{prefix}.resblocks.{index}"
            state.update({f"{block}.ln_1.weight": meta(width), f"{block}.ln_1.bias": meta(width),
                          f"{block}.attn.in_proj_weight": meta(3 * width, width),
                          f"{block}.attn.in_proj_bias": meta(3 * width),
                          f"{block}.attn.out_proj.weight": meta(width, width),
                          f"{block}.attn.out_proj.bias": meta(width),
                          f"{block}.ln_2.weight": meta(width), f"{block}.ln_2.bias": meta(width),
                          f"{block}.mlp.c_fc.weight": meta(4 * width, width),
                          f"{block}.mlp.c_fc.bias": meta(4 * width),
                          f"{block}.mlp.c_proj.weight": meta(width, 4 * width),
                          f"{block}.mlp.c_proj.bias": meta(width)})
        return state

    state = {"visual.class_embedding": meta(1280), "visual.positional_embedding": meta(257, 1280),
             "visual.proj": meta(1280, 1024), "visual.conv1.weight": meta(1280, 3, 14, 14),
             "token_embedding.weight": meta(49408, 1024), "positional_embedding": meta(77, 1024),
             "text_projection": meta(1024, 1024), "logit_scale": meta(())}
    for norm, width in (("visual.ln_pre", 1280), ("visual.ln_post", 1280), ("ln_final", 1024)):
        state.update({f"{norm}.weight": meta(width), f"{norm}.bias": meta(width)})
    state.update(blocks("visual.transformer", 1280, 32))
    state.update(blocks("transformer", 1024, 24))
    config = clip_config_from_open_clip(state, SimpleNamespace(bos_token_id=49406, eos_token_id=49407, pad_token_id=0))
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size,
            vision.image_size, vision.intermediate_size) == (1280, 32, 16, 14, 224, 5120)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.max_position_embeddings,
            text.vocab_size, config.projection_dim) == (1024, 24, 16, 77, 49408, 1024)
    with init_empty_weights():
        model = CLIPModel(config)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()
                if not key.endswith("position_ids")}
    assert {key: tuple(value.shape) for key, value in open_clip_to_transformers(state).items()} == expected
