"""Neuron activity scores and resets for the linear layers of a critic (TDPO-R, Zhang et al. 2024; ReDo,
Sokar et al. 2023).

A neuron is one output unit of a hidden `nn.Linear`. Its score on a probe batch is the mean of |ReLU(h_i)|
over the batch, divided by the mean of that over the layer's neurons (+1e-9): 1 is an average neuron, 0 one
that never fires. Dormant ⇔ score ≤ τ (TDPO-R: τ = 0); active = the rest. The last linear layer (the output)
has no neurons to score.

A reset re-draws a neuron: its incoming row and bias in the layer that produces it (row ~ N(0, std of that
layer), bias 0) and its outgoing column in the next linear layer (~ N(0, std of the next layer)), and zeroes
exactly those entries of AdamW's moments. The stds are the network's initialisation's: TDPO-R's official code
draws both with the critic's single 1/(w+1), w its input width (neuron_recycler.py:140 and :174). TDPO-R
resets the ACTIVE neurons (against primacy bias; the dormant ones act as a regulariser), ReDo the dormant
ones. Nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def hidden_linears(module: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """(layer, next layer) for every linear layer of `module` but the last, in registration order."""
    linears = [child for child in module.modules() if isinstance(child, nn.Linear)]
    return list(zip(linears[:-1], linears[1:], strict=True))


@torch.no_grad()
def neuron_scores(module: nn.Module, probe_inputs: tuple, reduce=None) -> list[torch.Tensor]:
    """One score tensor (out_features,) per hidden linear layer, from a forward pass of `module(*probe_inputs)`
    in eval mode. `reduce`, if given, maps each layer's (out_features,) batch means before normalising (e.g. an
    average over processes)."""
    layers = [layer for layer, _ in hidden_linears(module)]
    means: dict[nn.Linear, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(
        lambda layer, _, output: means.__setitem__(layer, output.relu().abs().reshape(-1, output.shape[-1]).mean(0)))
        for layer in layers]
    training = module.training
    module.eval()
    try:
        module(*probe_inputs)
    finally:
        module.train(training)
        for hook in hooks:
            hook.remove()
    scores = []
    for layer in layers:
        activity = means[layer] if reduce is None else reduce(means[layer])
        scores.append(activity / (activity.mean() + 1e-9))
    return scores


def dormant_masks(scores: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
    """Per layer, True where the neuron is dormant (score <= tau)."""
    return [score <= tau for score in scores]


@torch.no_grad()
def reset_neurons(module: nn.Module, masks: list[torch.Tensor], optimizer, generator: torch.Generator,
                  weight_std: Callable[[nn.Linear], float]) -> int:
    """Re-draw the neurons where `masks` (one bool (out_features,) per hidden linear layer) is True, each linear
    layer's entries with std `weight_std(layer)` (e.g. `TemporalCriticHead.weight_std`), and zero their AdamW
    moments. Returns how many neurons were reset."""
    count = 0
    for (layer, following), mask in zip(hidden_linears(module), masks, strict=True):
        rows = mask.nonzero().flatten().to(layer.weight.device)
        if len(rows) == 0:
            continue
        count += len(rows)
        incoming = torch.randn((len(rows), layer.in_features), generator=generator) * weight_std(layer)
        outgoing = torch.randn((following.out_features, len(rows)), generator=generator) * weight_std(following)
        layer.weight[rows] = incoming.to(layer.weight)
        following.weight[:, rows] = outgoing.to(following.weight)
        if layer.bias is not None:
            layer.bias[rows] = 0
        for parameter, index in ((layer.weight, (rows,)), (following.weight, (slice(None), rows))):
            _zero_moments(optimizer, parameter, index)
        if layer.bias is not None:
            _zero_moments(optimizer, layer.bias, (rows,))
    return count


def _zero_moments(optimizer, parameter: torch.Tensor, index: tuple) -> None:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # through accelerate's wrapper
    state = optimizer.state.get(parameter, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0
