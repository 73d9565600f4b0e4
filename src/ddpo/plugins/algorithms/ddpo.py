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

Log-probabilities are per-element means (DESIGN.md §7), the scale the clip range 1e-4 is calibrated to.
"""

from __future__ import annotations

from collections import defaultdict

import pydantic

import ddpo


class DDPOImportanceSampling(ddpo.Algorithm):
    """DDPO-IS: PPO-clipped importance-sampled policy gradient over denoising steps (Black et al. 2023)."""

    name = "ddpo-is"

    class Options(ddpo.Options):
        clip_range: float = pydantic.Field(1e-4, gt=0)
        """PPO clip range epsilon on the per-step likelihood ratio (paper: 1e-4)."""

    def update(self, run, trajectory):
        import torch

        config = run.config
        steps_per_sample = trajectory.num_train_steps(config.train.timestep_fraction)
        accumulator = run.accumulator(config.train.grad_accum * steps_per_sample)
        total = config.train.inner_epochs * (trajectory.batch_size // config.train.batch_size) * steps_per_sample
        statistics = defaultdict(list)
        with run.progress(total, f"epoch {run.epoch}/{config.epochs} training") as bar:
            for inner_epoch in range(config.train.inner_epochs):
                generator = run.generator(f"train-{inner_epoch}")
                for transitions in trajectory.training_transitions(config.train.batch_size, generator,
                                                                   config.train.timestep_fraction):
                    with accumulator.micro_step():
                        log_prob, *_ = run.model.step_log_prob(transitions, config.sample.eta,
                                                               config.sample.guidance_scale)
                        advantages = transitions.advantages
                        ratio = torch.exp(log_prob - transitions.log_probs)
                        clipped = torch.clamp(ratio, 1 - self.options.clip_range, 1 + self.options.clip_range)
                        loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
                        accumulator.backward(loss)
                    log_ratio = (log_prob - transitions.log_probs).detach()
                    statistics["loss/policy"].append(loss.item())
                    statistics["policy/approx_kl"].append(0.5 * (log_ratio**2).mean().item())
                    statistics["policy/clipfrac"].append(
                        ((ratio.detach() - 1).abs() > self.options.clip_range).float().mean().item())
                    statistics["policy/ratio_mean"].append(ratio.detach().mean().item())
                    bar.update(1)
        accumulator.check_finished()
        return _summarise(statistics, accumulator)


class DDPOScoreFunction(ddpo.Algorithm):
    """DDPO-SF: REINFORCE over denoising steps, one gradient step per round of sampling (Black et al. 2023)."""

    name = "ddpo-sf"

    def update(self, run, trajectory):
        config = run.config
        steps_per_sample = trajectory.num_train_steps(config.train.timestep_fraction)
        total = (trajectory.batch_size // config.train.batch_size) * steps_per_sample
        accumulator = run.accumulator(total)
        statistics = defaultdict(list)
        with run.progress(total, f"epoch {run.epoch}/{config.epochs} training") as bar:
            for transitions in trajectory.training_transitions(config.train.batch_size, run.generator("train"),
                                                               config.train.timestep_fraction):
                with accumulator.micro_step():
                    log_prob, *_ = run.model.step_log_prob(transitions, config.sample.eta,
                                                           config.sample.guidance_scale)
                    loss = -(transitions.advantages * log_prob).mean()
                    accumulator.backward(loss)
                statistics["loss/policy"].append(loss.item())
                bar.update(1)
        accumulator.check_finished()
        return _summarise(statistics, accumulator)


def _summarise(statistics: dict[str, list[float]], accumulator) -> dict[str, float]:
    """Epoch means of the per-micro-step statistics, plus the optimizer's step count and last gradient norm."""
    summary = {tag: sum(values) / len(values) for tag, values in statistics.items()}
    summary["loss/total"] = summary["loss/policy"]
    summary["train/optimizer_steps"] = float(accumulator.optimizer_steps)
    summary["train/grad_norm"] = accumulator.last_grad_norm
    return summary


@ddpo.hookimpl
def register_algorithms(register):
    register(DDPOImportanceSampling)
    register(DDPOScoreFunction)
