"""The `Run`: what the trainer hands to hooks and algorithms — the config, the loaded plugins, the trained
modules, this epoch's gathered rewards, and the run's seeded random streams.

It lives apart from the trainer so that plugins and the lower floors of the core can name it without
importing the training loop.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ddpo.core.configuration.config import RunConfig
from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.ema import WeightAverage
from ddpo.core.engine.guards import RunGuard
from ddpo.core.engine.onpolicy import SampledGradients
from ddpo.core.engine.optim import POLICY, GradientAccumulator, TrainedModule
from ddpo.core.math.advantages import PerPromptStatTracker, batch_advantages
from ddpo.core.plugin_api.base import Algorithm, PromptSet, Reward
from ddpo.core.plugin_api.model import Model


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (the run seed, the epoch, the process, a purpose)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Run:
    """A run in progress: what hooks and algorithms get."""

    config: RunConfig
    accelerator: Accelerator
    model: Model
    reward: Reward
    algorithm: Algorithm
    prompt_set: PromptSet
    run_dir: Path
    optimizer: Any
    """The policy's optimizer."""
    stat_tracker: PerPromptStatTracker | None
    eval_rewards: dict[str, Reward] = field(default_factory=dict)
    epoch: int = 0
    """The current epoch (numbered from 1); after a checkpoint load, the epoch it holds."""
    reward_queries: int = 0
    """Images scored by the training reward so far, over all processes."""
    gathered_rewards: torch.Tensor | None = None
    """(N,) this epoch's rewards over all processes, process 0's first."""
    gathered_prompts: list[str] | None = None
    """N prompts matching `gathered_rewards`."""
    modules: dict[str, TrainedModule] = field(default_factory=dict)
    """Every trained module by name: "policy" (the denoiser) and those the algorithm registered."""
    guard: RunGuard | None = None
    """Ctrl-C and numerical guards shared by the run's gradient accumulators (see guards.py)."""
    sampled_gradients: SampledGradients | None = None
    """With `train.gradient_from_sampling`: this epoch's per-sample gradients of the log-probs, taken while
    sampling, for this process's first samples (`ddpo.core.math.policy.add_sampled_gradients` uses them)."""
    weight_average: WeightAverage | None = None
    """With `train.ema_decay`: the moving average of the policy's trained weights (ddpo.core.engine.ema)."""
    base_eval_features: torch.Tensor | None = None
    """With `eval.num_steps`: (N, D) features of the base model's fixed evaluation images over all processes, what
    `monitor/drift` measures from (ddpo.core.engine.monitors)."""

    def __post_init__(self) -> None:
        if POLICY not in self.modules:
            self.modules[POLICY] = TrainedModule(POLICY, self.model.denoiser, self.optimizer,
                                                 self.config.train.max_grad_norm, self.weight_average)

    def evaluation_weights(self):
        """Context in which the policy holds the weights to evaluate: the moving average if there is one."""
        return self.weight_average.applied() if self.weight_average is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator for this epoch, process and purpose (e.g. "sample", "train")."""
        seed = derive_seed(self.config.seed, self.epoch, self.accelerator.process_index, purpose)
        return torch.Generator().manual_seed(seed)

    def register_module(self, name: str, module: torch.nn.Module, optimizer, max_grad_norm: float | None = None):
        """Train `module` with `optimizer` alongside the policy; call from `Algorithm.setup`.

        The module and optimizer are prepared by accelerate (moved to the device, wrapped for gradient sync),
        clipped to `max_grad_norm` (default `train.max_grad_norm`) when an accumulator steps them, and saved in
        and restored from checkpoints, so `--resume` is exact for them too. Returns the prepared
        `(module, optimizer)`; use those from then on.
        """
        if name in self.modules:
            raise ValueError(f"a trained module named '{name}' is already registered")
        if getattr(self.accelerator, "deepspeed_engine_wrapped", None) is not None:
            raise UsageError(f"algorithm '{self.config.algorithm.name}' trains a module of its own ('{name}') beside "
                             "the policy, and ddpo drives one DeepSpeed engine; shard with --distributed fsdp")
        module, optimizer = self.accelerator.prepare(module, optimizer)
        norm = self.config.train.max_grad_norm if max_grad_norm is None else max_grad_norm
        self.modules[name] = TrainedModule(name, module, optimizer, norm)
        return module, optimizer

    def accumulator(self, micro_steps: int, modules: tuple[str, ...] = (POLICY,)) -> GradientAccumulator:
        """A gradient accumulator over the named trained modules that steps them once per `micro_steps`
        backward passes (each clipped to its own norm)."""
        return GradientAccumulator(self.accelerator, [self.modules[name] for name in modules], micro_steps,
                                   guard=self.guard)

    def progress(self, total: int, description: str):
        """A progress bar on the main process, when stderr is a terminal."""
        return tqdm(total=total, desc=description, leave=False, disable=None if self.is_main else True,
                    dynamic_ncols=True)

    def local_part(self, gathered: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor gathered over all processes (process 0's rows first)."""
        return gathered.reshape(self.accelerator.num_processes, -1, *gathered.shape[1:])[self.accelerator.process_index]

    def default_advantages(self, trajectory) -> torch.Tensor:
        """DDPO's advantages for this process's trajectories (B,): rewards normalised per prompt over all
        processes (or over the whole batch). The trainer clips them to +-advantage.clip_max."""
        rewards = self.gathered_rewards.numpy()
        if self.stat_tracker is not None:
            advantages = self.stat_tracker.update(self.gathered_prompts, rewards)
        else:
            advantages = batch_advantages(rewards)
        local = self.local_part(torch.as_tensor(advantages, dtype=torch.float32))
        return local.to(trajectory.latents.device)
