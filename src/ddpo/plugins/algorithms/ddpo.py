"""DDPO: Training Diffusion Models with Reinforcement Learning (Black et al., ICLR 2024, arXiv 2305.13301).

Denoising is an MDP whose actions are the denoising steps; the reward arrives at x_0. Both estimators use
DDPO's advantages (rewards normalised per prompt with a running buffer, clipped to +-5), computed by the
trainer, and every denoising step of a trajectory shares its trajectory's advantage.

- DDPO-IS, importance sampling with PPO's clip, per step:
      rho = exp(log p_theta(x_{t-1} | x_t, c) - log p_old(x_{t-1} | x_t, c))
      L   = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))),  eps = 1e-4
  Samples are shuffled, each sample's steps are visited in its own random order, and one optimizer step
  accumulates `train.grad_accum` minibatches x the trained steps. The paper's SD 1.4 LoRA recipe: lr 3e-4,
  50 DDIM steps, eta 1, guidance 5, 256 samples and 2 optimizer steps per epoch (the built-in defaults,
  on 8 processes).
- DDPO-SF, the score-function (REINFORCE) estimator: L = -mean(A log p_theta), on-policy, so there is no
  ratio and one gradient step per round of sampling: the whole epoch's samples make one optimizer step.

Both estimators' first optimizer step is on-policy (ratio 1, where PPO's clip is inactive), so with
`train.gradient_from_sampling` its gradient comes from the sampling pass (ddpo.core.onpolicy): all of DDPO-SF's,
the first train.batch_size x train.grad_accum samples of DDPO-IS's.

Log-probabilities are per-element means (DESIGN.md §7), the scale the clip range 1e-4 is calibrated to.

Not in the paper: DDPO-IS takes an optional KL penalty to the pretrained model, DPOK's Gaussian form
(Fan et al. 2023) on each trained step, L += beta mean(KL(p_theta(. | x_t) || p_pre(. | x_t))). With beta = 0 (the
default) there is no reference pass and the loss is the paper's. Features the reward cannot see (the colour of
the digits demo's grey digits) get no policy gradient, only noise; the KL pulls them back to the base model.
"""

from __future__ import annotations

import pydantic

import ddpo


class DDPOImportanceSampling(ddpo.Algorithm):
    """DDPO-IS: PPO-clipped importance-sampled policy gradient over denoising steps (Black et al. 2023)."""

    name = "ddpo-is"

    class Options(ddpo.Options):
        clip_range: float = pydantic.Field(1e-4, gt=0)
        """PPO clip range epsilon on the per-step likelihood ratio (paper: 1e-4)."""
        kl_weight: float = pydantic.Field(0.0, ge=0)
        """Weight beta of the KL to the pretrained model (not in DDPO; 0 skips the reference pass): the exact
        Gaussian KL of each trained step, mean over elements of (mu - mu_ref)^2 / (2 sigma^2) with sigma the step's
        whole std (DPOK's closed form, not its default eps-MSE)."""

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_weight > 0

    def on_policy_samples(self, config):
        """The first optimizer step's samples: their ratios are 1, where the clip is inactive (without the KL term)."""
        return 0 if self.options.kl_weight > 0 else config.train.batch_size * config.train.grad_accum

    def update(self, run, trajectory):
        from ddpo.core.policy import EpochStatistics, clipped_surrogate, kl_to_reference, policy_update

        options, statistics = self.options, EpochStatistics()

        def loss(transitions, step):
            policy_loss, _ = clipped_surrogate(step.log_prob, transitions.log_probs, transitions.advantages,
                                               options.clip_range)
            total = policy_loss
            if options.kl_weight > 0:
                kl = kl_to_reference(run.model, transitions, step.mean, step.std, run.config.sample, statistics,
                                     reference_mean=step.reference().mean)
                total = policy_loss + options.kl_weight * kl
            return total, {"loss/policy": policy_loss, "loss/total": total}

        return policy_update(run, trajectory, loss, clip_range=options.clip_range, statistics=statistics,
                             reference=("mean",) if options.kl_weight > 0 else ())


class DDPOScoreFunction(ddpo.Algorithm):
    """DDPO-SF: REINFORCE over denoising steps, one gradient step per round of sampling (Black et al. 2023)."""

    name = "ddpo-sf"

    def on_policy_samples(self, config):
        """All of them: the epoch's one optimizer step comes after the whole epoch's backward passes."""
        return config.sample.batch_size * config.sample.batches_per_epoch

    def update(self, run, trajectory):
        from ddpo.core.policy import policy_update

        def loss(transitions, step):
            score_function = -(transitions.advantages * step.log_prob).mean()
            return score_function, {"loss/policy": score_function}

        return policy_update(run, trajectory, loss, once=True)


@ddpo.hookimpl
def register_algorithms(register):
    register(DDPOImportanceSampling)
    register(DDPOScoreFunction)
