"""Trained modules and gradient accumulation over a fixed number of micro-steps, then one clipped step.

The policy is one trained module; an algorithm can register more (a value baseline, a critic), each with its
own optimizer and clipping norm. Algorithms decide how many backward passes make one optimizer step (DDPO:
grad_accum minibatches x trained timesteps; DDPO-SF: the whole epoch). Gradients are only all-reduced across
processes on the last micro-step. Under DeepSpeed the engine clips and steps inside the backward pass that the
accumulator marks as the last micro-step (ddpo.core.engine.distributed).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from ddpo.core.engine.ema import WeightAverage
    from ddpo.core.engine.guards import RunGuard

POLICY = "policy"
"""The name of the trained module that is the denoiser."""


@dataclass
class TrainedModule:
    """A module the run trains, after `accelerator.prepare` (it may be wrapped for DDP)."""

    name: str
    """"policy" for the denoiser; the algorithm's name for its own modules (e.g. "value", "critic")."""
    module: torch.nn.Module
    optimizer: Any
    max_grad_norm: float
    average: WeightAverage | None = None
    """A moving average of the module's weights, told of every optimizer step (the policy's, with train.ema_decay)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.module.parameters() if parameter.requires_grad]


class GradientAccumulator:
    """Counts micro-steps; every `micro_steps`-th one clips each module's gradients and steps its optimizer.

    Use one `with accumulator.micro_step():` block per forward+backward, and call `accumulator.backward(loss)`
    inside it; the loss is divided by `micro_steps` so the step uses the mean gradient. A forward pass over
    several micro-steps' rows at once (stacked step positions) is `micro_step(size)`: its mean loss counts
    `size` times.
    """

    def __init__(self, accelerator: Accelerator, modules: list[TrainedModule], micro_steps: int,
                 guard: RunGuard | None = None):
        if micro_steps < 1:
            raise ValueError(f"micro_steps must be at least 1, got {micro_steps}")
        self.accelerator = accelerator
        self.modules = modules
        self.micro_steps = micro_steps
        self.count = 0
        self.size = 1
        """The micro-steps the current forward pass stands for."""
        self.optimizer_steps = 0
        self.guard = guard
        """Skips steps with non-finite losses or gradients and stops at Ctrl-C after a step (see guards.py)."""
        self.losses_finite = True
        self.grad_norms: dict[str, float] = {module.name: float("nan") for module in modules}
        """Each module's gradient norm before clipping, at the last optimizer step."""
        self.stepping = False
        """Whether the current micro-step completes an optimizer step."""
        self.deepspeed_engine_wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        """accelerate's wrapper of DeepSpeed's engine, which steps inside `backward`; None without DeepSpeed."""

    @property
    def last_grad_norm(self) -> float:
        """The first module's gradient norm at the last optimizer step."""
        return self.grad_norms[self.modules[0].name]

    @contextlib.contextmanager
    def micro_step(self, size: int = 1):
        """One forward+backward standing for `size` micro-steps; gradients sync across processes only when it
        completes an optimizer step. It must not run past one."""
        self._check_fits(size)
        self.count += size
        self.size = size
        self.stepping = self.count % self.micro_steps == 0
        with contextlib.ExitStack() as stack:
            if not self.stepping and self.deepspeed_engine_wrapped is None:
                for module in self.modules:
                    stack.enter_context(self.accelerator.no_sync(module.module))
            yield
        if self.stepping:
            self._step()

    def _check_fits(self, size: int) -> None:
        if self.count // self.micro_steps != (self.count + size - 1) // self.micro_steps:
            raise ValueError(f"a pass of {size} micro-steps after {self.count % self.micro_steps} of "
                             f"{self.micro_steps} runs past the optimizer step")

    def _step(self) -> None:
        """Clip and step every module; under DeepSpeed the engine did both in the last backward pass, and the
        accelerator reports its norm (DeepSpeed skips a step whose norm is not finite itself)."""
        for module in self.modules:
            norm = self.accelerator.clip_grad_norm_(module.parameters(), module.max_grad_norm)
            self.grad_norms[module.name] = float(norm) if norm is not None else float("nan")
        skip = self.guard is not None and self.guard.should_skip(self.losses_finite, list(self.grad_norms.values()))
        for module in self.modules:
            if not skip or self.accelerator.scaler is not None:  # a loss scaler skips them itself (and must)
                module.optimizer.step()
            module.optimizer.zero_grad(set_to_none=True)
            if module.average is not None:
                module.average.after_optimizer_step()
        self.losses_finite = True
        self.optimizer_steps += 1
        if self.guard is not None:
            self.guard.check_interrupt()

    def add_gradients(self, parameters: list[torch.nn.Parameter], gradients: list[torch.Tensor], size: int) -> None:
        """Accumulate gradients computed elsewhere as `size` micro-steps: `gradients` are those of the sum of the
        `size` micro-steps' losses (ddpo.core.engine.onpolicy's, from the sampling pass), scaled like `backward`'s. If
        they complete an optimizer step, the step is taken, the gradients averaged over processes first (no
        backward pass did)."""
        self._check_fits(size)
        self.losses_finite &= all(bool(torch.isfinite(gradient).all()) for gradient in gradients)
        for parameter, gradient in zip(parameters, gradients, strict=True):
            gradient = gradient.to(parameter.device, parameter.dtype) / self.micro_steps
            parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient
        self.count += size
        if self.count % self.micro_steps == 0:
            if self.accelerator.num_processes > 1:
                for parameter in parameters:
                    parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")
            self._step()

    def backward(self, loss: torch.Tensor) -> None:
        if self.guard is not None:
            self.losses_finite &= bool(torch.isfinite(loss.detach()).all())
        scaled = loss * self.size / self.micro_steps
        if self.deepspeed_engine_wrapped is not None:  # the engine steps in this backward pass if it ends a step
            self.deepspeed_engine_wrapped.backward(scaled, sync_gradients=self.stepping)
        else:
            self.accelerator.backward(scaled)

    def check_finished(self) -> None:
        """Fail loudly if gradients are left over (the micro-step count did not divide evenly)."""
        if self.count % self.micro_steps:
            raise RuntimeError(f"{self.count % self.micro_steps} micro-steps of gradients were never applied "
                               f"(one optimizer step per {self.micro_steps} micro-steps)")
