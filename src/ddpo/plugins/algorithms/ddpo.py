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
        from ddpo.core.policy import (EpochStatistics, add_sampled_gradients, clipped_surrogate, kl_to_reference,
                                      policy_passes)

        config = run.config
        steps_per_sample = trajectory.num_train_steps(config.train.timestep_fraction)
        accumulator = run.accumulator(config.train.grad_accum * steps_per_sample)
        statistics = EpochStatistics()
        sampled = add_sampled_gradients(run, trajectory, accumulator, statistics, self.options.clip_range)
        for transitions, first_minibatch in policy_passes(run, trajectory, accumulator, sampled=sampled):
            log_prob, mean, std, _ = run.model.step_log_prob(transitions, config.sample.eta,
                                                             config.sample.guidance_scale)
            policy_loss, _ = clipped_surrogate(log_prob, transitions.log_probs, transitions.advantages,
                                               self.options.clip_range)
            loss = policy_loss
            if self.options.kl_weight > 0:
                kl = kl_to_reference(run.model, transitions, mean, std, config.sample, statistics)
                loss = policy_loss + self.options.kl_weight * kl
            accumulator.backward(loss)
            statistics.add({"loss/policy": policy_loss.item(), "loss/total": loss.item()}, transitions.positions)
            statistics.add_ratio(log_prob, transitions.log_probs, self.options.clip_range, first_minibatch,
                                 transitions.positions)
        return statistics.summary(accumulator)


class DDPOScoreFunction(ddpo.Algorithm):
    """DDPO-SF: REINFORCE over denoising steps, one gradient step per round of sampling (Black et al. 2023)."""

    name = "ddpo-sf"

    def on_policy_samples(self, config):
        """All of them: the epoch's one optimizer step comes after the whole epoch's backward passes."""
        return config.sample.batch_size * config.sample.batches_per_epoch

    def update(self, run, trajectory):
        from ddpo.core.policy import EpochStatistics, add_sampled_gradients

        config = run.config
        steps_per_sample = trajectory.num_train_steps(config.train.timestep_fraction)
        total = (trajectory.batch_size // config.train.batch_size) * steps_per_sample
        accumulator = run.accumulator(total)
        statistics = EpochStatistics()
        sampled = add_sampled_gradients(run, trajectory, accumulator, statistics, None)
        remaining = trajectory[sampled:]
        with run.progress(total, f"epoch {run.epoch}/{config.epochs} training") as bar:
            bar.update(sampled // config.train.batch_size * steps_per_sample)
            positions_done = 0
            for transitions in ([] if not remaining.batch_size else remaining.training_transitions(
                    config.train.batch_size, run.generator("train"), config.train.timestep_fraction,
                    steps_per_pass=config.train.steps_per_pass, selection=config.train.timestep_selection)):
                with accumulator.micro_step(transitions.positions):
                    log_prob, *_ = run.model.step_log_prob(transitions, config.sample.eta,
                                                           config.sample.guidance_scale)
                    loss = -(transitions.advantages * log_prob).mean()
                    accumulator.backward(loss)
                statistics.add({"loss/policy": loss.item()}, transitions.positions)
                statistics.add_ratio(log_prob, transitions.log_probs, None, positions_done < steps_per_sample,
                                     transitions.positions)
                positions_done += transitions.positions
                bar.update(transitions.positions)
        accumulator.check_finished()
        return statistics.summary(accumulator)


@ddpo.hookimpl
def register_algorithms(register):
    register(DDPOImportanceSampling)
    register(DDPOScoreFunction)
