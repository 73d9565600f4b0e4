"""GRPO for diffusion and flow-matching models: group-relative policy optimisation as in Flow-GRPO (Liu et al.
2025, arXiv 2505.05470) and DanceGRPO (Xue et al. 2025, arXiv 2505.07818).

Each prompt is sampled `group_size` times (by default from one initial noise, as DanceGRPO does; Flow-GRPO
draws each member's noise), and the group is its own baseline: no running statistics, no critic.

    A_i = (r_i − mean_group(r)) / (std_group(r) + 1e-4)      (global_std: the epoch's std instead; Flow-GRPO's
                                                              configs use it)
    ρ   = exp(log p_θ(x_{t−1} | x_t, c) − log p_old(x_{t−1} | x_t, c))
    L   = mean(max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))) + β KL,   ε = 1e-4, A clipped to ±5 (advantage.clip_max)
    KL  = mean over elements of (μ_θ − μ_ref)² / (2 σ²),      μ_ref the step mean with the adapters off

β (`kl_beta`) is Flow-GRPO's, in its units (scripts/train_sd3.py:895): on the flow SDE, σ is the noise level's
std η sqrt(s / (1 − s)) at the step's sigma s, without the step's sqrt(|dt|), so KL is the exact per-element
Gaussian KL times |dt|, and the paper's β are typed as they are: 0.04 for GenEval and OCR, 0.01 for PickScore.
DDIM and DDPM steps have no dt: there σ is the step's own std and KL is the exact per-element Gaussian KL.

Groups are the images sampled together (`group_by: group`, DanceGRPO), or every image of the epoch with the same
prompt (`group_by: prompt`, Flow-GRPO's PerPromptStatTracker keyed by the prompt string, flow_grpo/stat_tracking.py:
16-31: a prompt drawn for two groups is one group). A group whose rewards are all equal has zero advantages and
teaches nothing; `grpo/zero_std_groups` counts them (a reward that saturates shows here first). Flow-GRPO leaves
such samples out of training (`drop_zero_advantages`, train_sd3.py:796-817): the minibatches keep their number and
shrink, and zero-advantage samples are put back at random where needed to fill them evenly (at least one each).

It works with every sampler: the flow-matching SDE on `sd3` (Flow-GRPO: group 24, 48 groups per epoch, 10
training steps of which the first 9 are trained in order, noise level 0.7, lr 3e-4, LoRA r32/α64, an EMA of the
weights; `--preset flow-grpo-sd35`) and DDIM on `sd14` or `digits` (DanceGRPO's SD 1.4 setting: group 16, 50
steps, eta 1, lr 1e-5). Groups larger than a sampling batch span batches and processes; the advantages are
computed from all processes' rewards.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import ddpo


class GroupRelativePolicyOptimization(ddpo.Algorithm):
    """GRPO: PPO clip with group-relative advantages, optional KL to the pretrained model (Flow-GRPO, DanceGRPO)."""

    name = "grpo"
    run_defaults = {"train": {"learning_rate": 3e-4}}
    # On digits, the demo's recipe (see the digits model) with groups of 8 and the demo's small KL to the base
    # model. Target 3, 10 epochs, seeds 0/1/2: 0.62/0.66/0.25 with legibility >= 0.967 and colour drift <= 0.017;
    # without the KL 0.64/0.53/0.40, but seed 2 fell to legibility 0.82 with drift 0.063 (base: 0.99, 0.01).
    model_run_defaults = {
        "digits": {
            "algorithm": {"name": "grpo", "clip_range": 0.2, "kl_beta": 0.1},
            "sample": {"batch_size": 32, "batches_per_epoch": 2},
            "train": {"batch_size": 16, "grad_accum": 1, "learning_rate": 2e-4},
        },
    }

    class Options(ddpo.Options):
        group_size: int = pydantic.Field(8, ge=2)
        """Images per prompt (Flow-GRPO: 24, DanceGRPO: 12-16; 8 suits CPU-sized runs)."""
        same_noise: bool = True
        """Members of a group start from the same initial noise (DanceGRPO) or each from its own (Flow-GRPO)."""
        global_std: bool = False
        """Divide by the std of the whole epoch's rewards instead of the group's (Flow-GRPO's configs)."""
        clip_range: float = pydantic.Field(1e-4, gt=0)
        """PPO clip range on the per-step ratio (both papers: 1e-4)."""
        kl_beta: float = pydantic.Field(0.0, ge=0)
        """Flow-GRPO's beta: the weight of the KL to the pretrained model in its units (see the module docstring;
        paper: 0.04 GenEval/OCR, 0.01 PickScore); 0 skips the reference pass (DanceGRPO)."""
        group_by: Literal["group", "prompt"] = "group"
        """What a group is: the images sampled together (DanceGRPO), or all the epoch's images of one prompt string
        (Flow-GRPO)."""
        drop_zero_advantages: bool = False
        """Leave samples whose advantage is 0 out of training (Flow-GRPO); the minibatches shrink, their number
        stays."""

    def __init__(self, options=None):
        super().__init__(options)
        self.zero_std_groups = 0

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_beta > 0

    def on_policy_samples(self, config):
        """The first optimizer step's samples: their ratios are 1, where the clip is inactive (without the KL term,
        and with every sample trained)."""
        if self.options.kl_beta > 0 or self.options.drop_zero_advantages:
            return 0
        return config.train.batch_size * config.train.grad_accum

    def group_size(self) -> int:
        return self.options.group_size

    def shares_group_noise(self) -> bool:
        return self.options.same_noise

    def compute_advantages(self, run, trajectory):
        from ddpo.core.math.advantages import epoch_group_advantages

        advantages, self.zero_std_groups = epoch_group_advantages(run, trajectory, self.options.group_by,
                                                                  self.options.global_std)
        return advantages

    def trained_samples(self, run, trajectory):
        """The samples to train on and the minibatch size: all of them at `train.batch_size`, or with
        `drop_zero_advantages` those with a non-zero advantage, topped up at random with zero-advantage ones to a
        multiple of the minibatch count (at least one sample each), in as many minibatches as before."""
        import torch

        batch_size = run.config.train.batch_size
        if not self.options.drop_zero_advantages:
            return trajectory, batch_size
        minibatches = trajectory.batch_size // batch_size
        advantages = trajectory.advantages.reshape(trajectory.batch_size, -1)
        kept = advantages.abs().sum(dim=1) != 0
        shortfall = -int(kept.sum()) % minibatches or (minibatches if not kept.any() else 0)
        zero = (~kept).nonzero().flatten().cpu()
        topped_up = zero[torch.randperm(len(zero), generator=run.generator("grpo-top-up"))[:shortfall]]
        kept[topped_up.to(kept.device)] = True
        rows = kept.nonzero().flatten()
        return trajectory[rows], len(rows) // minibatches

    def policy_loss(self, run, transitions, step) -> tuple:
        """The policy term of the loss on a pass's transitions (a scalar with gradient) and the scalars it logs by
        tag: PPO's clipped surrogate here."""
        from ddpo.core.math.policy import clipped_surrogate

        policy_loss, _ = clipped_surrogate(step.log_prob, transitions.log_probs, transitions.advantages,
                                           self.options.clip_range)
        return policy_loss, {}

    def update(self, run, trajectory):
        from ddpo.core.math.policy import EpochStatistics, kl_to_reference, policy_update

        options, statistics = self.options, EpochStatistics()

        def loss(transitions, step):
            policy_loss, tags = self.policy_loss(run, transitions, step)
            total = policy_loss
            if options.kl_beta > 0:
                kl = kl_to_reference(run.model, transitions, step.mean, step.std, run.config.sample, statistics,
                                     units="noise-level", reference_mean=step.reference().mean)
                total = policy_loss + options.kl_beta * kl
            return total, {"loss/policy": policy_loss, "loss/total": total, **tags}

        trained, batch_size = self.trained_samples(run, trajectory)
        summary = policy_update(run, trained, loss, clip_range=options.clip_range, statistics=statistics,
                                batch_size=batch_size, reference=("mean",) if options.kl_beta > 0 else ())
        summary["grpo/zero_std_groups"] = float(self.zero_std_groups)
        summary["grpo/trained_samples"] = float(trained.batch_size)
        return summary


@ddpo.hookimpl
def register_algorithms(register):
    register(GroupRelativePolicyOptimization)
