"""Weighted sums of rewards: `--reward aesthetic+clipscore`, or a `reward` section naming `multi` with components.

    reward:
      name: multi
      normalize: true              # z-score each component over the epoch before weighting
      components:
        aesthetic: {weight: 1.0}
        clipscore: {weight: 0.5, clip_model: openai/clip-vit-base-patch32}
        digit_3: {reward: digit, weight: 2, target: 3}    # a label of your own; `reward` names the plugin

During training each batch is scored by every component (`score_components`); after sampling, the trainer
gathers the epoch's component scores over all processes and `combine`s them:

    reward = sum_k w_k * z_k,   z_k = (s_k - mean_epoch(s_k)) / std_epoch(s_k)   (s_k itself without normalize)

and logs `reward/<label>/mean` (raw component means) beside `reward/mean` (the combined reward trained on, ~0
with normalisation). z-scoring before weighting keeps a reward measured in large units (PickScore ~20) from
drowning one in small units (a probability); the Flow-GRPO maintainers recommend it for multi-reward training.
Called directly (evaluation, `check_reward`, the reward server), the reward is the weighted sum of raw scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic

from ddpo.core.configuration.errors import UsageError
from ddpo.core.plugin_api.base import Options, Reward

if TYPE_CHECKING:
    import torch

    from ddpo.core.engine.run import Run
    from ddpo.core.plugin_api.schema import Trajectory

MULTI = "multi"
EXTRAS_PREFIX = "reward/"
"""Component scores travel through the rollout as `trajectory.extras["reward/<label>"]` (B,)."""


class Component(pydantic.BaseModel):
    """One summand: which reward plugin, its weight, and (as further keys) that plugin's options."""

    model_config = pydantic.ConfigDict(extra="allow", coerce_numbers_to_str=True)
    reward: str | None = None
    """Reward plugin name; default: the component's label."""
    weight: float = 1.0
    """Weight of the component in the sum."""

    def plugin_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def _validate_component(label: str, component: Component) -> Component:
    """The component with its plugin resolved and its options validated (and filled in) by the plugin."""
    from ddpo.core.configuration.config import describe_validation_error
    from ddpo.core.plugin_api.registry import get_registry

    name = component.reward or label
    if name == MULTI or "+" in name:
        raise UsageError(f"reward component '{label}' cannot itself be a sum of rewards")
    cls = get_registry().get("rewards", name)
    try:
        options = cls.Options.model_validate(component.plugin_options())
    except pydantic.ValidationError as error:
        raise UsageError(describe_validation_error(error, cls.Options, prefix=f"reward.components.{label}",
                                                   extra_valid=["reward", "weight"])
                         + f" (options of reward '{name}')") from None
    return Component(reward=name, weight=component.weight, **options.model_dump(mode="json"))


class MultiReward(Reward):
    """Weighted sum of other rewards, each z-scored over the epoch first (`--reward a+b` makes one)."""

    name = MULTI

    class Options(Options):
        components: dict[str, Component] = {}
        """The summed rewards by label: {label: {reward: NAME, weight: W, <that reward's options>}}."""
        normalize: bool = True
        """z-score each component over the epoch's samples (all processes) before weighting."""

        @pydantic.field_validator("components")
        @classmethod
        def _resolve_components(cls, components: dict[str, Component]) -> dict[str, Component]:
            if not components:
                raise ValueError("name at least one component, e.g. --reward aesthetic+clipscore")
            return {label: _validate_component(label, component) for label, component in components.items()}

    def load(self, device):
        from ddpo.core.plugin_api.registry import get_registry

        registry = get_registry()
        self.rewards = {label: registry.get("rewards", component.reward)(component.plugin_options())
                        for label, component in self.options.components.items()}
        for reward in self.rewards.values():
            reward.load(device)

    def score_components(self, images, prompts, metadata) -> dict[str, torch.Tensor]:
        """Every component's checked scores (B,) for one batch, by label."""
        from ddpo.core.engine.rollout import score

        return {label: score(reward, images, prompts, metadata) for label, reward in self.rewards.items()}

    def combine(self, components: dict[str, torch.Tensor], normalize: bool | None = None) -> torch.Tensor:
        """The weighted sum (N,) of component scores (N,), each z-scored first if `normalize` (default: the
        option). A component with zero spread contributes 0 when normalised."""
        import torch

        normalize = self.options.normalize if normalize is None else normalize
        total = torch.zeros_like(next(iter(components.values())), dtype=torch.float32)
        for label, values in components.items():
            values = values.float()
            if normalize:
                std = values.std(unbiased=False)
                values = (values - values.mean()) / std if std > 0 else torch.zeros_like(values)
            total += self.options.components[label].weight * values
        return total

    def __call__(self, images, prompts, metadata):
        return self.combine(self.score_components(images, prompts, metadata), normalize=False)


def expand_reward_sum(user: dict[str, Any]) -> dict[str, Any]:
    """A config layer with `reward.name: a+b` rewritten as the `multi` reward with components a and b (options
    given under `reward.components.<label>` are kept)."""
    reward = user.get("reward")
    if not isinstance(reward, dict) or "+" not in str(reward.get("name", "")):
        return user
    labels = [label.strip() for label in str(reward["name"]).split("+")]
    if not all(labels) or len(set(labels)) != len(labels):
        raise UsageError(f"--reward {reward['name']}: name each reward once, joined by '+' (e.g. aesthetic+clipscore)")
    given = dict(reward.get("components") or {})
    unknown = sorted(set(given) - set(labels))
    if unknown:
        raise UsageError(f"reward.components.{unknown[0]} is not one of the summed rewards {', '.join(labels)}")
    components = {label: given.get(label) or {} for label in labels}
    return {**user, "reward": {**reward, "name": MULTI, "components": components}}


def combine_epoch_rewards(run: Run, trajectory: Trajectory) -> dict[str, torch.Tensor]:
    """For a `multi` training reward: set `trajectory.rewards` to the combination of the epoch's component scores
    (statistics over all processes) and return the `reward/<label>/mean` scalars; otherwise do nothing."""
    reward = run.reward
    if not isinstance(reward, MultiReward) or f"{EXTRAS_PREFIX}{next(iter(reward.rewards))}" not in trajectory.extras:
        return {}
    device = run.accelerator.device
    gathered = {label: run.accelerator.gather(trajectory.extras[f"{EXTRAS_PREFIX}{label}"].to(device)).cpu()
                for label in reward.rewards}
    trajectory.rewards = run.local_part(reward.combine(gathered)).to(trajectory.latents.device)
    return {f"reward/{label}/mean": values.mean() for label, values in gathered.items()}
