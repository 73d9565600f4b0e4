"""Critics over denoising states: value models that predict the final reward of a trajectory from one of its
intermediate states, so that r − V is a lower-variance advantage than r. Algorithms create them in `setup`
and register them with `run.register_module`, which trains, syncs and checkpoints them.

- `StepValueNetwork` is DPOK's value baseline (Fan et al. 2023, official code `ValueMulti`): V(x_t, c, step),
  the flattened state concatenated with a prompt vector (`prompt_vector`), through linear layers gated by a
  learned embedding of the step index, then one linear output.
- `TemporalCriticHead` is TDPO-R's temporal critic (Zhang et al. 2024): V(features of x_t) only — no step, no
  prompt — an MLP in→1024→128→64→16→1 without activations on `CriticFeatures` (the decoded state's CLIP
  embedding, or its pixels through a small conv stem), whose neurons `ddpo.core.math.neurons` scores and resets.
  Its weights are drawn N(0, std) at initialisation and at every reset, biases 0. The official code uses one
  std for every layer, 1/(w+1) with w the width the MLP reads (768 for CLIP ViT-L/14, 1024 for PickScore and
  HPSv2: tdpo_pytorch/critic_model.py:33, neuron_recycler.py:140 and :174); `per-layer`, ddpo's first reading,
  takes each layer's own input width instead, 1/(in+1).
- `clipped_value_loss` and `explained_variance` are what any critic's training and logging share.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class ConditionalLinear(nn.Module):
    """A linear layer whose output is multiplied, feature by feature, by a learned gate per step index:
    y = (W x + b) * g[step]. Shapes: x (B, in_features), steps (B,) int64 in [0, num_steps) -> y (B, out_features).
    """

    def __init__(self, in_features: int, out_features: int, num_steps: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Embedding(num_steps, out_features)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.uniform_(self.gate.weight)  # positive gates in [0, 1): every step starts with a non-zero signal

    def forward(self, inputs: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self.linear(inputs) * self.gate(steps)


def prompt_vector(prompt_embeds: torch.Tensor | dict[str, torch.Tensor] | None) -> torch.Tensor | None:
    """One float32 vector (B, D) per sample from a model's prompt embeddings: the mean over tokens of (B, L, D)
    embeddings; for a dict (SD3: `prompt_embeds` (B, L, D) and `pooled_prompt_embeds` (B, P)), each entry's
    vector (token mean, or the entry itself when it is already (B, P)) concatenated in key order. None stays None."""
    if prompt_embeds is None:
        return None
    if isinstance(prompt_embeds, dict):
        return torch.cat([prompt_vector(prompt_embeds[key]) for key in sorted(prompt_embeds)], dim=1)
    return (prompt_embeds.mean(dim=1) if prompt_embeds.ndim == 3 else prompt_embeds).float()


class StepValueNetwork(nn.Module):
    """V(x_t, c, step): the expected final reward from state x_t of a trajectory for prompt c at step index
    `step` (0 for the first denoising step, num_steps - 1 for the last; the index, not the timestep value).

    Input: concat[flatten(x_t), `prompt_vector` of the prompt embeddings] -> `depth` ConditionalLinear layers
    of `hidden_size` units, each followed by ReLU -> Linear -> 1. DPOK's critic has depth 3 and 256 units.

    Args:
        sample_shape: (C, H, W) of one state x_t.
        prompt_dim: width D of the prompt vectors (B, D); 0 for an unconditional model (no prompt input).
        num_steps: denoising steps T of the trajectories (the number of step gates).
    """

    def __init__(self, sample_shape: tuple[int, ...], prompt_dim: int, num_steps: int, hidden_size: int = 256,
                 depth: int = 3):
        super().__init__()
        self.sample_size = 1
        for size in sample_shape:
            self.sample_size *= int(size)
        self.prompt_dim = prompt_dim
        widths = [self.sample_size + prompt_dim] + [hidden_size] * depth
        self.layers = nn.ModuleList(ConditionalLinear(widths[i], widths[i + 1], num_steps) for i in range(depth))
        self.output = nn.Linear(hidden_size, 1)

    def forward(self, sample: torch.Tensor, steps: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """Values (B,) float32 for states `sample` (B, C, H, W) at step indices `steps` (B,) int64, with
        `prompts` (B, D) from `prompt_vector`, or None when the network was built with `prompt_dim` 0."""
        inputs = sample.reshape(sample.shape[0], -1).float()
        if self.prompt_dim:
            if prompts is None or tuple(prompts.shape) != (sample.shape[0], self.prompt_dim):
                got = "none" if prompts is None else f"shape {tuple(prompts.shape)}"
                raise ValueError(f"this value network expects prompt vectors ({sample.shape[0]}, {self.prompt_dim}), "
                                 f"got {got}")
            inputs = torch.cat([inputs, prompts.float()], dim=1)
        hidden = inputs
        for layer in self.layers:
            hidden = torch.relu(layer(hidden, steps))
        return self.output(hidden).squeeze(-1)


CriticInit = Literal["paper", "per-layer"]
"""How a `TemporalCriticHead` draws its weights (initialisation and resets): one std 1/(w+1) for every layer, w the
MLP's input width (`paper`), or 1/(in+1) with each layer's own input width (`per-layer`)."""


class TemporalCriticHead(nn.Module):
    """TDPO-R's critic head V(features of x_t) -> (B,): Linear in→1024 – Dropout 0.2 – 1024→128 – Dropout 0.2 –
    128→64 – Dropout 0.1 – 64→16 – 16→1, no activations (the LAION aesthetic predictor's shape), weights
    N(0, `weight_std`), biases 0. With `pixel_shape` (C, H, W) given, a small conv stem reads the decoded
    state's pixels (flattened in the features) and feeds the head instead; the MLP's input width is then the
    stem's output (512).

    Args:
        feature_dim: F, the width of the stored features (B, F).
        pixel_shape: (C, H, W) when the features are flattened pixels; None for embeddings (CLIP).
        init: `CriticInit`, the std of the MLP's weights (the paper's single one by default).
    """

    def __init__(self, feature_dim: int, pixel_shape: tuple[int, int, int] | None = None,
                 init: CriticInit = "paper"):
        super().__init__()
        self.pixel_shape = pixel_shape
        self.init = init
        self.stem = None
        width = feature_dim
        if pixel_shape is not None:
            channels = pixel_shape[0]
            self.stem = nn.Sequential(nn.Conv2d(channels, 16, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                      nn.Flatten())
            width = 32 * 4 * 4
        self.mlp = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=self.weight_std(layer))
                nn.init.zeros_(layer.bias)

    def weight_std(self, layer: nn.Linear) -> float:
        """The std of `layer`'s weights, one of the MLP's, at initialisation and when a reset re-draws them."""
        width = self.mlp[0].in_features if self.init == "paper" else layer.in_features
        return 1 / (width + 1)

    def mlp_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """What the MLP reads for features (B, F): the features, or the conv stem's output on the pixels."""
        features = features.float()
        if self.stem is None:
            return features
        return self.stem(features.reshape(features.shape[0], *self.pixel_shape))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Values (B,) float32 for features (B, F)."""
        return self.mlp(self.mlp_inputs(features)).squeeze(-1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float) -> torch.Tensor:
    """PPO's clipped value loss 0.5 · mean(max((V − R)², (clip(V, V_old ± ε) − R)²)) over (B,) values."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 − Var(R − V) / Var(R): 1 is a perfect critic, 0 no better than a constant, negative worse."""
    variance = returns.float().var(unbiased=False)
    if variance == 0:
        return float("nan")
    return float(1 - (returns.float() - values.float()).var(unbiased=False) / variance)


PIXEL_SIDE = 32
"""Decoded states are resized to at most this many pixels a side for the `pixels` critic features."""


class CriticFeatures:
    """What a temporal critic reads of a state x_t, computed once per epoch right after sampling (training never
    decodes again): the decoded image's L2-normalised CLIP embedding (`clip`, TDPO-R's input; the training
    reward's CLIP is shared when the reward is `aesthetic` with the same `clip_model`), or its pixels, resized to
    at most 32 x 32 (`pixels`, for offline and CPU runs).

    Args:
        kind: "clip" or "pixels".
        clip_model: hub id or local directory of the CLIP whose vision tower embeds (kind "clip").
    """

    def __init__(self, kind: str, clip_model: str = ""):
        self.kind = kind
        self.clip_model = clip_model
        self.embed = None
        self.pixel_shape: tuple[int, int, int] | None = None
        self.feature_dim = 0
        """F, known after `load`."""

    def load(self, model, reward, device: torch.device) -> None:
        """Prepare the feature extractor for `model`'s states; reuse `reward`'s CLIP when it has the same one."""
        if self.kind == "pixels":
            side = min(PIXEL_SIDE, model.decode(model.initial_noise(1, torch.Generator().manual_seed(0))).shape[-1])
            self.pixel_shape = (3, side, side)
            self.feature_dim = 3 * side * side
            return
        if getattr(reward, "image_embeddings", None) is not None and \
                getattr(reward.options, "clip_model", None) == self.clip_model:
            self.embed = reward.image_embeddings
        else:
            self.embed = self._load_clip(device)
        self.feature_dim = self.embed(torch.zeros(1, 3, 32, 32)).shape[1]

    def _load_clip(self, device: torch.device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import ClipImagePreprocessor, quiet_loading

        with quiet_loading():
            vision = transformers.CLIPVisionModelWithProjection.from_pretrained(self.clip_model).to(device).eval()
        preprocess = ClipImagePreprocessor.from_pretrained(self.clip_model)

        @torch.no_grad()
        def embed(images):
            embeddings = vision(pixel_values=preprocess(images.to(device))).image_embeds.float()
            return torch.nn.functional.normalize(embeddings, dim=-1)

        return embed

    @torch.no_grad()
    def __call__(self, model, states: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """Features (N, E) float32 of states (N, *S), decoded `chunk` at a time. A state that decodes to a video
        (3, F, H, W) has the mean of its F frames' features (as a video's reward is its frames' mean)."""
        parts = []
        for start in range(0, states.shape[0], chunk):
            images = model.decode(states[start:start + chunk])
            if images.ndim == 5:
                frames = images.shape[2]
                features = self._image_features(images.transpose(1, 2).flatten(0, 1))
                parts.append(features.reshape(-1, frames, features.shape[1]).mean(dim=1))
            else:
                parts.append(self._image_features(images))
        return torch.cat(parts).to(states.device)

    def _image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, E) float32 features on the CPU of images (N, 3, H, W) in [0, 1]."""
        if self.kind == "pixels":
            images = torch.nn.functional.interpolate(images, size=self.pixel_shape[1:], mode="area")
            return images.flatten(1).float().cpu()
        return self.embed(images).float().cpu()
