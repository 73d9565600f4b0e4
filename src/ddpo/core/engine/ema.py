"""An exponential moving average of the policy's trained weights, as Flow-GRPO keeps one (flow_grpo/ema.py,
scripts/train_sd3.py:444-445 and 954-955): decay 0.9, updated every 8 optimizer steps, used to evaluate and to save.

After the optimizer step that makes n steps so far, when (n + 1) is a multiple of `every`:

    d_n   = min(decay, (1 + n) / (10 + n))           (the warm-up: early averages follow the weights closely)
    ema  += (1 − d_n) (θ − ema)

`applied()` puts the average into the model for a while (evaluation, saving) and the trained weights back after.
Training always continues from the trained weights; a checkpoint holds both (ddpo.core.engine.checkpoint).
"""

from __future__ import annotations

import contextlib

import torch

from ddpo.core.engine.distributed import shard_like

WARMUP_OFFSET = 10
"""The warm-up's d_n = (1 + n) / (10 + n) reaches 0.9 at n = 80."""


class WeightAverage:
    """The moving average of `parameters` (name -> trained parameter, the names of `Model.trainable_state_dict`).

    Args:
        parameters: the trained parameters by name; the average starts at their current values.
        decay: the average's decay (below 1).
        every: update after every `every`-th optimizer step (counting as Flow-GRPO does, see the module docstring).
    """

    def __init__(self, parameters: dict[str, torch.nn.Parameter], decay: float, every: int):
        self.parameters = parameters
        self.decay = decay
        self.every = every
        self.average = {name: parameter.detach().float().clone() for name, parameter in parameters.items()}
        self.optimizer_steps = 0
        """Optimizer steps taken so far in the run (n)."""

    def decay_at(self, steps: int) -> float:
        return min(self.decay, (1 + steps) / (WARMUP_OFFSET + steps))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Count the step; on every `every`-th count, move the average towards the weights."""
        self.optimizer_steps += 1
        if (self.optimizer_steps + 1) % self.every:
            return
        weight = 1 - self.decay_at(self.optimizer_steps)
        for name, parameter in self.parameters.items():
            self.average[name].add_(weight * (parameter.detach().float() - self.average[name]))

    def applied(self):
        """Inside, the model's trained parameters hold the average; afterwards, exactly their trained values."""
        return weights_applied(self.parameters, self.average)

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """The average (CPU tensors, in the trained parameters' dtype, as a checkpoint's weights) and the step count."""
        return ({name: average.to("cpu", self.parameters[name].dtype).contiguous()
                 for name, average in self.average.items()}, self.optimizer_steps)

    def load(self, average: dict[str, torch.Tensor] | None, optimizer_steps: int) -> None:
        """Restore a saved average and step count; with no saved average (a run that had none), start it at the
        current weights."""
        for name, parameter in self.parameters.items():
            source = parameter.detach() if average is None else shard_like(parameter, average[name])
            self.average[name] = source.to(parameter.device, torch.float32).clone()
        self.optimizer_steps = optimizer_steps


@contextlib.contextmanager
def weights_applied(parameters: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]):
    """Inside, each of `parameters` (name -> parameter) holds `weights[name]` (another set of the same weights: a
    moving average, an algorithm's old policy); afterwards, exactly its own values again."""
    own = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(weights[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(own[name])
