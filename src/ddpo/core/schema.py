"""The typed batch of trajectories that flows from the rollout engine to the algorithms.

Shapes use B for the batch, T for the number of denoising steps of the schedule, (C, H, W) for one state in the
model's space (latents for Stable Diffusion, pixels for pixel-space DDPMs), L and D for the prompt
embedding's sequence length and width.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace

import torch

_PER_STEP = ("timesteps", "log_probs", "policy_steps", "ref_log_probs", "values")


@dataclass
class Trajectory:
    """A batch of sampled denoising trajectories and what the algorithms attach to them.

    Step k goes from `latents[:, k]` (x_t at `timesteps[:, k]`) to `latents[:, k + 1]`.

    Attributes:
        latents: (B, T+1, C, H, W) float32, every state of the chain, x_T first, x_0 last.
        timesteps: (B, T) int64, the timestep of each step.
        log_probs: (B, T) float32, log-probability of each step's outcome under the sampling policy
            (per-element mean, DESIGN.md §7); 0 where `policy_steps` is False.
        policy_steps: (B, T) bool, True where the step is a stochastic policy action. Deterministic steps
            (sigma_t = 0) are False and never trained on.
        prompts: B prompt strings (empty strings for unconditional models).
        prompt_metadata: B dicts from the prompt set.
        prompt_embeds: (B, L, D) text-encoder output, or None for unconditional models.
        rewards: (B,) float32 training reward, once scored.
        advantages: (B,) or (B, T) float32, once computed.
        group_ids: (B,) int64, trajectories with the same id share a prompt and an initial noise.
        ref_log_probs: (B, T) float32, log-probabilities under a reference policy (algorithm extra).
        values: (B, T) float32, critic values V(x_t) at sampling time (algorithm extra).
        features: (B, T+1, F) float32, per-state features, e.g. a critic's image embeddings (algorithm extra).
        extras: other batch-first tensors (B, ...) keyed by name.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    policy_steps: torch.Tensor
    prompts: list[str]
    prompt_metadata: list[dict]
    prompt_embeds: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    group_ids: torch.Tensor | None = None
    ref_log_probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    features: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def validate(self) -> None:
        """Check every shape against `latents` and `timesteps`; the error names the field and both shapes."""
        if self.latents.ndim < 3:
            raise ValueError(f"latents must be (B, T+1, ...), got shape {tuple(self.latents.shape)}")
        batch, states = self.latents.shape[:2]
        expected = {name: (batch, states - 1) for name in _PER_STEP}
        expected.update(rewards=(batch,), group_ids=(batch,))
        for name, shape in expected.items():
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"Trajectory.{name} has shape {tuple(value.shape)}, expected {shape} "
                                 f"(latents {tuple(self.latents.shape)})")
        if self.advantages is not None and tuple(self.advantages.shape) not in ((batch,), (batch, states - 1)):
            raise ValueError(f"Trajectory.advantages has shape {tuple(self.advantages.shape)}, expected "
                             f"({batch},) or ({batch}, {states - 1})")
        for name in ("prompt_embeds", "features"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"Trajectory.{name} has shape {tuple(value.shape)}, expected batch {batch} "
                                 f"first (latents {tuple(self.latents.shape)})")
        if self.features is not None and self.features.shape[1] != states:
            raise ValueError(f"Trajectory.features has shape {tuple(self.features.shape)}, expected "
                             f"({batch}, {states}, F)")
        for name, value in self.extras.items():
            if value.shape[0] != batch:
                raise ValueError(f"Trajectory.extras['{name}'] has shape {tuple(value.shape)}, expected batch "
                                 f"{batch} first")
        for name in ("prompts", "prompt_metadata"):
            if len(getattr(self, name)) != batch:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries, expected {batch}")

    def _map(self, tensor_fn, list_fn) -> Trajectory:
        """A new Trajectory with `tensor_fn` applied to every tensor and `list_fn` to the prompt lists."""
        changes = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                changes[item.name] = tensor_fn(value)
            elif isinstance(value, list):
                changes[item.name] = list_fn(value)
        changes["extras"] = {name: tensor_fn(value) for name, value in self.extras.items()}
        return replace(self, **changes)

    def to(self, device: torch.device | str) -> Trajectory:
        return self._map(lambda tensor: tensor.to(device), list)

    def __getitem__(self, index: torch.Tensor | slice) -> Trajectory:
        """The sub-batch at `index` (a slice, or a 1-D tensor of indices)."""
        if isinstance(index, slice):
            return self._map(lambda tensor: tensor[index], lambda items: items[index])
        positions = index.tolist()
        return self._map(lambda tensor: tensor[index.to(tensor.device)],
                         lambda items: [items[i] for i in positions])

    @classmethod
    def cat(cls, trajectories: list[Trajectory]) -> Trajectory:
        """Concatenate along the batch; an optional field must be set in all parts or in none."""
        first = trajectories[0]
        changes = {}
        for item in fields(first):
            values = [getattr(part, item.name) for part in trajectories]
            if item.name == "extras":
                keys = set(values[0])
                if any(set(value) != keys for value in values):
                    raise ValueError("cannot concatenate trajectories with different extras")
                changes["extras"] = {key: torch.cat([value[key] for value in values]) for key in keys}
            elif all(value is None for value in values):
                changes[item.name] = None
            elif any(value is None for value in values):
                raise ValueError(f"cannot concatenate trajectories where only some have '{item.name}'")
            elif isinstance(values[0], list):
                changes[item.name] = [entry for value in values for entry in value]
            else:
                changes[item.name] = torch.cat(values)
        return replace(first, **changes)

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> list[Trajectory]:
        """Split into consecutive sub-batches of `size`, after shuffling the batch if a generator is given."""
        order = (torch.randperm(self.batch_size, generator=generator) if generator is not None
                 else torch.arange(self.batch_size))
        return [self[order[start:start + size]] for start in range(0, self.batch_size, size)]

    def num_train_steps(self, fraction: float = 1.0) -> int:
        """How many steps per sample are trained on: int(policy steps x fraction), at least one."""
        return max(1, int(int(self.policy_steps[0].sum()) * fraction))

    def shuffled_steps(self, generator: torch.Generator, fraction: float = 1.0) -> torch.Tensor:
        """(B, n) step indices to train on: each sample's policy steps in its own random order, the first
        `n = int(num_policy_steps * fraction)` of them (at least one)."""
        if not bool((self.policy_steps == self.policy_steps[0]).all()):
            raise ValueError("all trajectories of a batch must share their policy steps")
        policy = self.policy_steps[0].nonzero().flatten().cpu()
        count = self.num_train_steps(fraction)
        orders = [policy[torch.randperm(len(policy), generator=generator)[:count]] for _ in range(self.batch_size)]
        return torch.stack(orders).to(self.timesteps.device)

    def training_transitions(self, batch_size: int, generator: torch.Generator,
                             fraction: float = 1.0) -> Iterator[Transitions]:
        """DDPO's training order: shuffle the samples, draw each sample's steps in its own random order
        (`shuffled_steps`), then for each minibatch of `batch_size`, yield its transitions step position by
        step position. Yields (B / batch_size) x n transitions of `batch_size` samples."""
        shuffled = self[torch.randperm(self.batch_size, generator=generator)]
        steps = shuffled.shuffled_steps(generator, fraction)
        for minibatch, minibatch_steps in zip(shuffled.minibatches(batch_size), steps.split(batch_size), strict=True):
            for position in range(minibatch_steps.shape[1]):
                yield minibatch.transitions(minibatch_steps[:, position])

    def transitions(self, steps: torch.Tensor) -> Transitions:
        """The transition each sample takes at its step `steps[b]` ((B,) int64 indices into the steps)."""
        rows = torch.arange(self.batch_size, device=steps.device)
        per_step = lambda tensor: None if tensor is None else tensor[rows, steps]  # noqa: E731
        advantages = self.advantages
        if advantages is not None and advantages.ndim == 2:
            advantages = per_step(advantages)
        return Transitions(
            sample=self.latents[rows, steps],
            next_sample=self.latents[rows, steps + 1],
            timesteps=self.timesteps[rows, steps],
            log_probs=self.log_probs[rows, steps],
            prompt_embeds=self.prompt_embeds,
            advantages=advantages,
            steps=steps,
            ref_log_probs=per_step(self.ref_log_probs),
            values=per_step(self.values),
        )


@dataclass
class Transitions:
    """One step of each trajectory of a batch, as the algorithms train on it.

    Attributes:
        sample: (B, C, H, W) x_t.
        next_sample: (B, C, H, W) x_{t-1}, the action taken.
        timesteps: (B,) int64.
        log_probs: (B,) float32, log-probability under the sampling policy.
        prompt_embeds: (B, L, D) or None.
        advantages: (B,) or None.
        steps: (B,) int64, the index of the step within its trajectory.
        ref_log_probs: (B,) or None.
        values: (B,) or None.
    """

    sample: torch.Tensor
    next_sample: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor | None
    advantages: torch.Tensor | None
    steps: torch.Tensor
    ref_log_probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
