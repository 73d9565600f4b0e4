"""Gradients from the sampling pass (`train.gradient_from_sampling`): the on-policy samples' policy gradient
without a second forward pass.

Right after sampling, before any optimizer step, the likelihood ratio of every transition is exactly 1, so
the gradient of DDPO's losses over those samples is the score-function gradient

    g = sum_i w_i G_i,   G_i = sum_t grad log p_theta(x_{t-1} | x_t, c_i),   w_i = -A_i / train.batch_size

(PPO's clip is inactive at ratio 1: DDPO-IS's first optimizer step has DDPO-SF's gradient). The advantages A_i
are known only once the epoch is scored, but the per-sample sums G_i can be formed while sampling: each
denoising step's forward keeps its graph, and one backward pass through the step's log-probs gives every
sample's own gradient. The training pass then skips those samples' forward passes, which saves one forward
per denoising step per on-policy sample (on benchmarks/vs_trl.py's workload, an epoch took 0.83-0.88x as long
for DDPO-IS, whose first of two optimizer steps is on-policy, and about 0.74x for DDPO-SF, all on-policy).

Per-sample gradients come from ordinary autograd: while a batch samples, each LoRA matrix (a bias-free
`nn.Linear` of peft's) is swapped for `PerSampleLinear`, which holds one copy of the matrix per sample, so
the copy's gradient is that sample's alone. Row r of a denoiser batch belongs to sample r mod B (guidance
stacks the unconditional and conditional halves, as every built-in model does). The swapped modules are made
once and kept, so a compiled denoiser compiles the swapped graph once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ddpo.core.configuration.errors import UsageError


class PerSampleLinear(nn.Module):
    """A bias-free linear map with one weight copy per sample: `weight` (S, out, in). Input rows (m·S, ..., in)
    use the copy of sample `row mod S`; output (m·S, ..., out)."""

    def __init__(self, linear: nn.Linear, samples: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().unsqueeze(0).repeat(samples, 1, 1))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        samples, out_features, _ = self.weight.shape
        rows = inputs.unflatten(0, (-1, samples))  # (m, S, ..., in)
        tokens = rows.flatten(2, -2) if rows.ndim > 3 else rows.unsqueeze(2)  # (m, S, N, in)
        output = torch.einsum("msni,soi->msno", tokens, self.weight)
        return output.reshape(*inputs.shape[:-1], out_features)


@dataclass
class SampledGradients:
    """This epoch's per-sample gradients, for the first `count` samples of this process in sampling order."""

    parameters: list[nn.Parameter]
    """The policy's trainable parameters (the LoRA matrices)."""
    per_sample: list[torch.Tensor]
    """One (count, *parameter.shape) tensor per parameter: G_i = sum over trained steps of grad log p."""

    @property
    def count(self) -> int:
        return self.per_sample[0].shape[0]

    def combine(self, weights: torch.Tensor) -> list[torch.Tensor]:
        """sum_i weights[i] G_i per parameter; `weights` (count,)."""
        weights = weights.to(self.per_sample[0].device, torch.float32)
        return [torch.einsum("s,s...->...", weights, gradients) for gradients in self.per_sample]


class SamplingGradients:
    """Collects per-sample gradients of the log-probs while batches sample (see the module docstring)."""

    def __init__(self, denoiser: nn.Module, model_name: str, no_sync=contextlib.nullcontext):
        """`denoiser` without wrappers (the LoRA matrices are swapped inside it); `no_sync()`, a context in which
        the wrapped denoiser's forward passes set up no gradient sync across processes (accelerate's `no_sync`):
        the swapped copies are not the parameters DDP syncs."""
        sites = [(parent, name, child) for parent in denoiser.modules() for name, child in parent.named_children()
                 if isinstance(child, nn.Linear) and child.weight.requires_grad]
        covered = {id(child.weight) for _, _, child in sites}
        others = [name for name, parameter in denoiser.named_parameters()
                  if parameter.requires_grad and id(parameter) not in covered]
        if others or any(child.bias is not None and child.bias.requires_grad for _, _, child in sites) or not sites:
            raise UsageError(f"train.gradient_from_sampling needs LoRA adapters (bias-free linear layers) as the only "
                             f"trained weights of model '{model_name}'; set model.use_lora=true or "
                             "train.gradient_from_sampling=false")
        self.sites = sites
        self.swaps: dict[int, list[PerSampleLinear]] = {}
        """Per batch size, the per-sample modules in the order of `sites`, kept for the run."""
        self.collected: list[list[torch.Tensor]] = []
        self.no_sync = no_sync

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [child.weight for _, _, child in self.sites]

    @contextlib.contextmanager
    def batch(self, samples: int):
        """Inside, the LoRA matrices are per-sample copies of themselves for a batch of `samples`; call
        `backward` once per denoising step. On leaving, the batch's gradients are kept for `take`."""
        if samples not in self.swaps:
            self.swaps[samples] = [PerSampleLinear(child, samples) for _, _, child in self.sites]
        swaps = self.swaps[samples]
        with torch.no_grad():
            for (_, _, child), swap in zip(self.sites, swaps, strict=True):
                swap.weight.copy_(child.weight.unsqueeze(0).expand_as(swap.weight))
                swap.weight.grad = None
        for (parent, name, _), swap in zip(self.sites, swaps, strict=True):
            setattr(parent, name, swap)
        try:
            with self.no_sync():
                yield
        finally:
            for parent, name, child in self.sites:
                setattr(parent, name, child)
        self.collected.append([swap.weight.grad if swap.weight.grad is not None else torch.zeros_like(swap.weight)
                               for swap in swaps])

    @staticmethod
    def backward(log_prob: torch.Tensor) -> None:
        """Add each sample's gradient of this step's log-probs (B,) to its copies."""
        log_prob.sum().backward()

    def take(self) -> SampledGradients | None:
        """The epoch's per-sample gradients, batches in sampling order (None if no batch collected them)."""
        if not self.collected:
            return None
        per_sample = [torch.cat(batches) for batches in zip(*self.collected, strict=True)]
        self.collected = []
        return SampledGradients(self.parameters, per_sample)
