"""Value baselines over denoising states: V(x_t, prompt, step) predicts the final reward of a trajectory from
one of its intermediate states, so that r − V is a lower-variance advantage than r.

`StepValueNetwork` is the critic of DPOK (Fan et al. 2023, official code `ValueMulti`): the flattened state
concatenated with a prompt embedding, through linear layers whose outputs are gated by a learned embedding of
the step index, then one linear output. It is an ordinary `nn.Module`: an algorithm creates it in `setup` and
registers it with `run.register_module`, which trains, syncs and checkpoints it.
"""

from __future__ import annotations

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


class StepValueNetwork(nn.Module):
    """V(x_t, c, step): the expected final reward from state x_t of a trajectory for prompt c at step index
    `step` (0 for the first denoising step, num_steps - 1 for the last; the index, not the timestep value).

    Input: concat[flatten(x_t), mean over tokens of the prompt embedding] -> `depth` ConditionalLinear layers
    of `hidden_size` units, each followed by ReLU -> Linear -> 1. DPOK's critic has depth 3 and 256 units.

    Args:
        sample_shape: (C, H, W) of one state x_t.
        prompt_dim: width D of the prompt embeddings (B, L, D); 0 for an unconditional model (no prompt input).
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

    def forward(self, sample: torch.Tensor, steps: torch.Tensor, prompt_embeds: torch.Tensor | None) -> torch.Tensor:
        """Values (B,) float32 for states `sample` (B, C, H, W) at step indices `steps` (B,) int64, with
        `prompt_embeds` (B, L, D), or None when the network was built with `prompt_dim` 0."""
        inputs = sample.reshape(sample.shape[0], -1).float()
        if self.prompt_dim:
            if prompt_embeds is None:
                raise ValueError(f"this value network expects prompt embeddings of width {self.prompt_dim}")
            inputs = torch.cat([inputs, prompt_embeds.float().mean(dim=1)], dim=1)
        hidden = inputs
        for layer in self.layers:
            hidden = torch.relu(layer(hidden, steps))
        return self.output(hidden).squeeze(-1)
