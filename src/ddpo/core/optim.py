"""Gradient accumulation over a fixed number of micro-steps, then one clipped optimizer step.

Algorithms decide how many backward passes make one optimizer step (DDPO: grad_accum minibatches x trained
timesteps; DDPO-SF: the whole epoch). Gradients are only all-reduced across processes on the last micro-step.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator


class GradientAccumulator:
    """Counts micro-steps; every `micro_steps`-th one clips the gradients and steps the optimizer.

    Use one `with accumulator.micro_step():` block per forward+backward, and call `accumulator.backward(loss)`
    inside it; the loss is divided by `micro_steps` so the step uses the mean gradient.
    """

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, optimizer, parameters: list,
                 micro_steps: int, max_grad_norm: float):
        if micro_steps < 1:
            raise ValueError(f"micro_steps must be at least 1, got {micro_steps}")
        self.accelerator = accelerator
        self.module = module
        self.optimizer = optimizer
        self.parameters = parameters
        self.micro_steps = micro_steps
        self.max_grad_norm = max_grad_norm
        self.count = 0
        self.optimizer_steps = 0
        self.last_grad_norm = float("nan")

    @contextlib.contextmanager
    def micro_step(self):
        """One forward+backward; gradients sync across processes only when this micro-step steps."""
        self.count += 1
        stepping = self.count % self.micro_steps == 0
        with contextlib.nullcontext() if stepping else self.accelerator.no_sync(self.module):
            yield
        if stepping:
            norm = self.accelerator.clip_grad_norm_(self.parameters, self.max_grad_norm)
            self.last_grad_norm = float(norm) if norm is not None else float("nan")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer_steps += 1

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss / self.micro_steps)

    def check_finished(self) -> None:
        """Fail loudly if gradients are left over (the micro-step count did not divide evenly)."""
        if self.count % self.micro_steps:
            raise RuntimeError(f"{self.count % self.micro_steps} micro-steps of gradients were never applied "
                               f"(one optimizer step per {self.micro_steps} micro-steps)")
