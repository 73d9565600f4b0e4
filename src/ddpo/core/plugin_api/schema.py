"""The typed batch of trajectories that flows from the rollout engine to the algorithms.

Shapes use B for the batch, T for the number of denoising steps of the schedule, S for the shape of one state in
the model's space — (C, H, W) for images (latents for Stable Diffusion, pixels for pixel-space DDPMs), (C, F, H, W)
for videos (Wan: F latent frames) — and L and D for the prompt embedding's sequence length and width. Nothing here
depends on S's rank: per-step log-probabilities and KLs are means over all of a state's elements, shape (B,).

Every field of `Trajectory` declares what it is indexed by (a state, a step, or a sample); `Transitions`, the
one-step slices the algorithms train on, is built from those declarations, so a new field is one edit here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any

import torch

STATE, STEP, SAMPLE = "state", "step", "sample"
"""Field kinds: (B, T+1, ...) one entry per state; (B, T) one per step; (B, ...) or a list of B, one per sample."""


def _declare(kind: str, *, required: bool = False, transition_names: tuple[str, str] | None = None, **kwargs):
    """A Trajectory field of `kind` (optional, default None, unless `required`). A state field becomes two
    transition fields (`transition_names`: the state the step leaves and the one it reaches); the others keep
    their name."""
    if not required and "default_factory" not in kwargs:
        kwargs["default"] = None
    return field(metadata={"kind": kind, "transition_names": transition_names}, **kwargs)


@dataclass
class Trajectory:
    """A batch of sampled denoising trajectories and what the algorithms attach to them.

    Step k goes from `latents[:, k]` (x_t at `timesteps[:, k]`) to `latents[:, k + 1]` (at `prev_timesteps[:, k]`).

    Attributes:
        latents: (B, T+1, *S) float32, every state of the chain, x_T first, x_0 last: (B, T+1, C, H, W) for images,
            (B, T+1, C, F, H, W) for videos.
        timesteps: (B, T), the model's time input at each step: int64 for DDIM/DDPM, float32 (sigma x
            num_train_timesteps) for flow matching.
        log_probs: (B, T) float32, log-probability of each step's outcome under the sampling policy
            (per-element mean, DESIGN.md §7); 0 where `policy_steps` is False.
        policy_steps: (B, T) bool, True where the step is a stochastic policy action. Deterministic steps
            (sigma_t = 0) are False and never trained on.
        prompts: B prompt strings (empty strings for unconditional models).
        prompt_metadata: B dicts from the prompt set.
        prev_timesteps: (B, T), the time each step lands on (-1 past the end of a DDIM/DDPM schedule), as
            recorded when sampling. Recomputing a log-prob uses it, never the scheduler's mutable state.
        prompt_embeds: (B, L, D) text-encoder output; or a dict of batch-first tensors for models conditioned on
            several (SD3, FLUX: {"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P)}; SDXL also
            "add_time_ids": (B, 6), its size and crop conditioning); None for unconditional models.
        rewards: (B,) float32 training reward, once scored.
        advantages: (B,) or (B, T) float32, once computed.
        group_ids: (B,) int64, trajectories with the same id share a prompt and an initial noise; unique across
            the processes of a run.
        ref_log_probs: (B, T) float32, log-probabilities under a reference policy (algorithm extra).
        values: (B, T) float32, critic values V(x_t) at sampling time (algorithm extra).
        features: (B, T+1, E) float32, E features per state, e.g. a critic's image embeddings (algorithm extra).
        extras: other batch-first tensors (B, ...) keyed by name.
    """

    latents: torch.Tensor = _declare(STATE, required=True, transition_names=("sample", "next_sample"))
    timesteps: torch.Tensor = _declare(STEP, required=True)
    log_probs: torch.Tensor = _declare(STEP, required=True)
    policy_steps: torch.Tensor = _declare(STEP, required=True)
    prompts: list[str] = _declare(SAMPLE, required=True)
    prompt_metadata: list[dict] = _declare(SAMPLE, required=True)
    prev_timesteps: torch.Tensor | None = _declare(STEP)
    prompt_embeds: torch.Tensor | dict[str, torch.Tensor] | None = _declare(SAMPLE)
    rewards: torch.Tensor | None = _declare(SAMPLE)
    advantages: torch.Tensor | None = _declare(SAMPLE)  # or per step: (B, T), see `transitions`
    group_ids: torch.Tensor | None = _declare(SAMPLE)
    ref_log_probs: torch.Tensor | None = _declare(STEP)
    values: torch.Tensor | None = _declare(STEP)
    features: torch.Tensor | None = _declare(STATE, transition_names=("features", "next_features"))
    extras: dict[str, torch.Tensor] = _declare(SAMPLE, default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]

    def validate(self) -> None:
        """Check every shape against `latents`; the error names the field and both shapes."""
        if self.latents.ndim < 3:
            raise ValueError("Trajectory.latents must be (B, T+1, *S), e.g. (B, T+1, C, H, W) or "
                             f"(B, T+1, C, F, H, W), got shape {tuple(self.latents.shape)}")
        batch, states = self.latents.shape[:2]
        for item in fields(self):
            value = getattr(self, item.name)
            if value is None or item.name in ("latents", "advantages"):
                continue
            if isinstance(value, dict):
                for key, tensor in value.items():
                    if tensor.shape[0] != batch:
                        raise ValueError(f"Trajectory.{item.name}['{key}'] has shape {tuple(tensor.shape)}, "
                                         f"expected batch {batch} first")
                continue
            if isinstance(value, list):
                if len(value) != batch:
                    raise ValueError(f"Trajectory.{item.name} has {len(value)} entries, expected {batch}")
                continue
            kind = item.metadata["kind"]
            leading = {STATE: (batch, states), STEP: (batch, states - 1), SAMPLE: (batch,)}[kind]
            exact = kind == STEP or item.name in ("rewards", "group_ids")
            shape = tuple(value.shape)
            if (shape if exact else shape[:len(leading)]) != leading:
                wanted = leading if exact else (*leading, "...")
                raise ValueError(f"Trajectory.{item.name} has shape {shape}, expected "
                                 f"{tuple(wanted)} (latents {tuple(self.latents.shape)})")
        if self.advantages is not None and tuple(self.advantages.shape) not in ((batch,), (batch, states - 1)):
            raise ValueError(f"Trajectory.advantages has shape {tuple(self.advantages.shape)}, expected "
                             f"({batch},) or ({batch}, {states - 1})")

    def _map(self, tensor_fn, list_fn) -> Trajectory:
        """A new Trajectory with `tensor_fn` applied to every tensor and `list_fn` to the prompt lists."""
        changes = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                changes[item.name] = tensor_fn(value)
            elif isinstance(value, list):
                changes[item.name] = list_fn(value)
            elif isinstance(value, dict):
                changes[item.name] = {key: tensor_fn(tensor) for key, tensor in value.items()}
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
            if isinstance(values[0], dict):
                keys = set(values[0])
                if any(not isinstance(value, dict) or set(value) != keys for value in values):
                    raise ValueError(f"cannot concatenate trajectories with different '{item.name}' keys")
                changes[item.name] = {key: torch.cat([value[key] for value in values]) for key in keys}
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

    def shuffled_steps(self, generator: torch.Generator, fraction: float = 1.0, group_size: int = 1,
                       selection: str = "random") -> torch.Tensor:
        """(B, n) step indices to train on, `n = int(num_policy_steps * fraction)` (at least one) per sample.
        `selection` "random" (DDPO): each sample's policy steps in its own random order, the first n of them; with
        `group_size` k > 1, the k consecutive members of a group share one order. "first" (Flow-GRPO): the first n
        policy steps in order, for every sample (the generator is not drawn from)."""
        if not bool((self.policy_steps == self.policy_steps[0]).all()):
            raise ValueError("all trajectories of a batch must share their policy steps")
        policy = self.policy_steps[0].nonzero().flatten().cpu()
        count = self.num_train_steps(fraction)
        if selection == "first":
            return policy[:count].expand(self.batch_size, count).to(self.timesteps.device)
        orders = [policy[torch.randperm(len(policy), generator=generator)[:count]]
                  for _ in range(self.batch_size // group_size)]
        return torch.stack(orders).repeat_interleave(group_size, dim=0).to(self.timesteps.device)

    def group_order(self, generator: torch.Generator, group_size: int = 1) -> torch.Tensor:
        """(B,) a random order of the samples that keeps each group's k consecutive members together (k = 1: a
        plain permutation). The batch must hold whole groups, members adjacent, as the rollout samples them."""
        if self.batch_size % group_size:
            raise ValueError(f"a batch of {self.batch_size} does not hold whole groups of {group_size}")
        groups = torch.randperm(self.batch_size // group_size, generator=generator)
        return (groups[:, None] * group_size + torch.arange(group_size)).flatten()

    def training_transitions(self, batch_size: int, generator: torch.Generator, fraction: float = 1.0,
                             group_size: int = 1, steps_outer: bool = False, steps_per_pass: int = 1,
                             selection: str = "random") -> Iterator[Transitions]:
        """DDPO's training order: shuffle the samples, draw each sample's steps (`shuffled_steps` with `selection`:
        in its own random order, or the first ones in order), then for each minibatch of `batch_size`, yield its
        transitions step position by step position. Yields (B / batch_size) x n transitions of `batch_size` samples.

        With `steps_per_pass` P > 1, P consecutive step positions of a minibatch come stacked in one
        `Transitions` of P x `batch_size` rows (position-major, `positions` = P; the minibatch's last one may hold
        fewer): one forward pass instead of P, in the same order.

        With `steps_outer` (TDPO's temporal order) the loops swap: for each step position, every minibatch.
        With `group_size` k > 1 (pairs, GRPO groups), groups are shuffled whole and their members share a step
        order, so rows [j*k, (j+1)*k) of every transitions batch are one group at one step; `batch_size` must
        be a multiple of k."""
        if batch_size % group_size:
            raise ValueError(f"train batch size {batch_size} must be a multiple of the group size {group_size}")
        shuffled = self[self.group_order(generator, group_size)]
        steps = shuffled.shuffled_steps(generator, fraction, group_size, selection)
        pairs = list(zip(shuffled.minibatches(batch_size), steps.split(batch_size), strict=True))
        if steps_outer:
            for position in range(steps.shape[1]):
                for minibatch, minibatch_steps in pairs:
                    yield minibatch.transitions(minibatch_steps[:, position])
            return
        for minibatch, minibatch_steps in pairs:
            for start in range(0, minibatch_steps.shape[1], steps_per_pass):
                yield stack_transitions([minibatch.transitions(minibatch_steps[:, position])
                                         for position in range(start, min(start + steps_per_pass,
                                                                          minibatch_steps.shape[1]))])

    def transitions(self, steps: torch.Tensor) -> Transitions:
        """The transition each sample takes at its step `steps[b]` ((B,) int64 indices into the steps)."""
        rows = torch.arange(self.batch_size, device=steps.device)
        values: dict[str, Any] = {"steps": steps}
        for item in fields(self):
            value = getattr(self, item.name)
            kind = item.metadata["kind"]
            if item.name == "advantages" and value is not None and value.ndim == 2:
                kind = STEP
            if value is None:
                continue
            if kind == STATE:
                leaving, reaching = item.metadata["transition_names"]
                values[leaving], values[reaching] = value[rows, steps], value[rows, steps + 1]
            elif kind == STEP:
                values[item.name] = value[rows, steps]
            else:
                values[item.name] = value
        return Transitions(**values)


def _transition_fields() -> list[tuple[str, Any, Any]]:
    names = []
    for item in fields(Trajectory):
        names.extend(item.metadata["transition_names"] or (item.name,))
    specs = [(name, Any, field(default=None)) for name in names if name != "extras"]
    return [*specs, ("steps", Any, field(default=None)), ("extras", Any, field(default_factory=dict)),
            ("positions", int, field(default=1))]


Transitions = make_dataclass("Transitions", _transition_fields())
Transitions.__module__ = __name__
Transitions.__doc__ = """One step of each trajectory of a batch, as the algorithms train on it: every field of
`Trajectory` at the step each sample takes (B first; None where the trajectory has none).

Attributes:
    sample: (B, *S) x_t, the state the step leaves; next_sample: (B, *S) x_{t-1}, the action taken ((B, C, H, W)
        for images, (B, C, F, H, W) for videos).
    features, next_features: (B, E) the per-state features of those two states.
    timesteps, prev_timesteps, log_probs, policy_steps, ref_log_probs, values: (B,) the step's entries.
    advantages: (B,) the sample's advantage, or its step's for per-step advantages.
    prompts, prompt_metadata (B entries), prompt_embeds (B, L, D), rewards, group_ids (B,), extras: per sample.
    steps: (B,) int64, the index of the step within its trajectory.
    positions: how many step positions of the same trajectories are stacked in these rows (1, or P from
        `stack_transitions`: then every field's B is P x the trajectories, position-major).
"""


def stack_transitions(parts: list[Transitions]) -> Transitions:
    """Stack the transitions of several step positions into one batch (tensors and lists concatenated in order,
    dicts per key), to train them in one forward pass; `positions` adds up. One part is returned as it is."""
    if len(parts) == 1:
        return parts[0]

    def stacked(values: list):
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {key: stacked([value[key] for value in values]) for key in values[0]}
        if isinstance(values[0], list):
            return [entry for value in values for entry in value]
        return torch.cat(values)

    changes = {item.name: stacked([getattr(part, item.name) for part in parts]) for item in fields(parts[0])
               if item.name != "positions"}
    return replace(parts[0], **changes, positions=sum(part.positions for part in parts))


def prompt_embeds_at(prompt_embeds: torch.Tensor | dict[str, torch.Tensor] | None,
                     rows: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor] | None:
    """A trajectory's prompt embeddings (a (B, L, D) tensor, a dict of batch-first tensors, or None) at `rows`,
    without indexing the rest of the trajectory."""
    if prompt_embeds is None:
        return None
    if isinstance(prompt_embeds, dict):
        return {key: value[rows] for key, value in prompt_embeds.items()}
    return prompt_embeds[rows]
