"""Base classes that plugins subclass: options, rewards, algorithms, prompt sets.

Importing this module is cheap (no torch): `ddpo list` reads plugin classes without loading any model.
The model base class lives in `ddpo.core.plugin_api.model`.
"""

from __future__ import annotations

import contextlib
import inspect
import random
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic

if TYPE_CHECKING:
    import torch

    from ddpo.core.configuration.config import RunConfig
    from ddpo.core.engine.run import Run
    from ddpo.core.plugin_api.schema import Trajectory


class Options(pydantic.BaseModel):
    """A plugin's options: a pydantic model that refuses unknown keys.

    Field docstrings become the help text shown by `ddpo config` and the docs.
    """

    model_config = pydantic.ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class Plugin:
    """What every plugin kind shares: a `name`, nested `Options`, and `self.options` after construction."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "plugin"

    class Options(Options):
        pass

    def __init__(self, options: Options | dict[str, Any] | None = None):
        if not isinstance(options, self.Options):
            options = self.Options.model_validate(options or {})
        self.options = options

    @classmethod
    def description(cls) -> str:
        """The first line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


class Reward(Plugin):
    """Scores a batch of images.

    `load(device)` runs once before the first batch (load heavy weights there, never at import time).
    `__call__(images, prompts, metadata)` gets a float tensor (B, 3, H, W) in [0, 1], a list of B prompts and a
    list of B metadata dicts, and returns a float tensor (B,) or a list of B floats. It runs in a worker thread,
    overlapping the sampling of the next batch.
    """

    kind = "reward"

    def load(self, device: torch.device) -> None:
        """Load weights onto `device`; called once per process before the first batch."""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor | list[float]:
        raise NotImplementedError(f"reward '{self.name}' does not implement __call__")


class Algorithm(Plugin):
    """Turns scored trajectories into parameter updates.

    The trainer calls, per epoch: `compute_advantages` (unless a plugin's `compute_advantages` hook answers
    first), then `update`, which returns the scalars to log. `setup` runs once after the model and its
    optimizer are prepared. Modules it trains (a critic, say) are registered with `run.register_module`, which
    checkpoints them; other state goes through `state_dict`/`load_state_dict` so that `--resume` restores it.
    """

    kind = "algorithm"
    needs_log_probs: ClassVar[bool] = True
    """Whether the algorithm uses per-step log-probabilities (then sampling with eta=0 is refused)."""
    keeps_groups_together: ClassVar[bool] = False
    """Whether training needs a group's members in one minibatch at one step (pairwise losses); then
    `train.batch_size` must be a multiple of the group size."""
    needs_step_means: ClassVar[bool] = False
    """Whether training reads the sampling policy's step means (`trajectory.extras[ddpo.core.engine.rollout.
    STEP_MEANS]`, (B, T, C, H, W), as `Transitions.extras` per sample); then the rollout keeps them."""
    needs_sde_window: ClassVar[bool] = False
    """Whether the algorithm only makes sense with `sample.sde_window` set (MixGRPO); then a run without it is
    refused."""
    needs_reference: ClassVar[bool] = False
    """Whether the algorithm uses the pretrained model (`run.model.reference()`); the trainer then prepares it
    before training (a frozen copy of the denoiser when all its weights are trained)."""
    run_defaults: ClassVar[dict[str, Any]] = {}
    """Run-config values this algorithm recommends (its paper's recipe), applied over the model's and under the
    user's."""
    model_run_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    """Per model name, run-config values that suit this algorithm on that model, applied over `run_defaults`
    (e.g. {"digits": {...}}: the settings under which it learns on the embedded demo)."""

    def group_size(self) -> int:
        """How many trajectories share a prompt (and an initial noise, see `shares_group_noise`): 2 for
        pairwise methods, GRPO's group size."""
        return 1

    def shares_group_noise(self) -> bool:
        """Whether the members of a group start from the same initial noise."""
        return True

    def setup(self, run: Run) -> None:
        """Create extra trained modules (`run.register_module`); called once on every rank before the first
        epoch, before a resumed run's checkpoint is loaded."""

    def compute_advantages(self, run: Run, trajectory: Trajectory) -> torch.Tensor:
        """Advantages (B,) or (B, T) for this rank's trajectories; the default is DDPO's per-prompt normalisation.
        Whatever computes them, the trainer clips them to +-advantage.clip_max."""
        return run.default_advantages(trajectory)

    def on_policy_samples(self, config: RunConfig) -> int:
        """How many of each epoch's first samples (per process, in sampling order) the first optimizer step
        trains at likelihood ratio 1 with the loss -A log p per step, so that `train.gradient_from_sampling`
        can take their gradient from the sampling pass; 0 (the default): none."""
        return 0

    def sampling_weights(self, run: Run) -> contextlib.AbstractContextManager:
        """A context inside which the policy holds the weights that sample the epoch's trajectories (e.g.
        DiffusionNFT's soft-updated old policy), the trained weights back afterwards; the default samples with the
        trained weights themselves."""
        return contextlib.nullcontext()

    def offline_trajectories(self, run: Run) -> tuple[Trajectory, torch.Tensor] | None:
        """This epoch's trajectories to train on instead of sampling new ones, with `rewards` set, and their
        images (B, 3, H, W) in [0, 1] (e.g. D3PO's human-labelled pairs); None (the default): sample."""
        return None

    def update(self, run: Run, trajectory: Trajectory) -> dict[str, float]:
        raise NotImplementedError(f"algorithm '{self.name}' does not implement update")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PromptSet(Plugin):
    """Draws prompts: `sample(rng)` returns one `(prompt, metadata)` pair."""

    kind = "prompts"

    def sample(self, rng: random.Random) -> tuple[str, dict]:
        raise NotImplementedError(f"prompt set '{self.name}' does not implement sample")
