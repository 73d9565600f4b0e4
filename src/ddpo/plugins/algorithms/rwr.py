"""RWR: reward-weighted regression, the baseline of DDPO (Black et al., ICLR 2024, arXiv 2305.13301).

RWR treats the sampled images as a dataset and fine-tunes the model with its own training loss on them, each
image weighted by how well it scored. Only the final samples x_0 matter: no log-probabilities, so sampling
may be deterministic (eta 0).

- RWR: weights over the epoch's N samples of all processes, w = softmax(r / temperature), and
      L   = sum_i w_i l_i
      l_i = mean over elements of (target - eps_hat(sqrt(abar_t) x0_i + sqrt(1 - abar_t) eps, t, c_i))^2
  with fresh noise eps and a uniform timestep t per sample, the target by the scheduler's prediction type
  (epsilon, v, x_0, or the flow velocity). The prediction is guided, eps_hat = eps_u + w (eps_c - eps_u) with the
  sampling guidance w, as every RWR config of the official code trains (`train_cfg: True`,
  jannerm/ddpo config/base.py:164, ddpo/training/diffusion.py:62-79); `guided_loss=false` regresses eps_c alone.
  The paper's code multiplies the rewards by 1/5: temperature 5. With `per_prompt` (the official aesthetic
  config's `per_prompt_weights`, config/base.py:337; ddpo/utils/hdf5.py:437-451) the softmax runs within each
  prompt's samples, and each prompt's weights are scaled by its share of the samples.
- RWR-sparse: keep the samples whose reward is at or above the 90th percentile of the epoch's rewards and
  train on them unweighted: w_i = 1/K for the K kept samples, 0 for the others. The official sparse configs
  sample each batch from one prompt and take the percentile per batch (`identical_batch: True`, `mask_mode:
  percentile`, config/base.py:112-116; pipeline/sample.py:92-98, 138): here `per_prompt` with
  `images_per_prompt` images per prompt.

Minibatches are drawn from this process's samples; a sample's loss enters its minibatch's mean scaled by
N w_i, so the mean over an optimizer step's minibatches, averaged over the processes, is an unbiased estimate
of the gradient of sum_i w_i l_i, and exactly that gradient when one step takes the whole epoch
(`train.grad_accum` = minibatches per process).

The paper alternates sampling with several epochs of fine-tuning on the samples, 10 rounds (pipeline/run-rwr.sh,
run-sparse.sh): 10,240 samples and 5 fine-tuning epochs per round for RWR; for RWR-sparse, 50 epochs on 1,024
kept samples, the 90th percentile of about 10,240 sampled. Here a round is an epoch of the run and the
fine-tuning epochs are `train.inner_epochs`; `run_defaults` hold that recipe (samples per round at 8 sampled
images per batch on 8 processes, like the built-in DDPO defaults).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pydantic

import ddpo

if TYPE_CHECKING:
    import torch

PAPER_PROCESSES, PAPER_BATCH = 8, 8
"""The sampling layout the built-in defaults assume: 8 processes x 8 images per batch."""


def _per_prompt(weights_of, rewards: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
    """`weights_of(rewards)` over all rewards, or with `prompts` within each prompt's rewards, each prompt's weights
    scaled by its share of the samples (so that all of them still sum to 1)."""
    import torch

    rewards = rewards.to(torch.float64)
    if prompts is None:
        return weights_of(rewards)
    weights = torch.empty_like(rewards)
    for prompt in dict.fromkeys(prompts):
        members = torch.tensor([entry == prompt for entry in prompts])
        weights[members] = weights_of(rewards[members]) * members.sum() / len(prompts)
    return weights


def softmax_weights(rewards: torch.Tensor, temperature: float, prompts: list[str] | None = None) -> torch.Tensor:
    """RWR's weights softmax(r / temperature) (N,) float64 over the rewards of all processes, or within each
    prompt's with `prompts` (N prompt strings); they sum to 1."""
    import torch

    return _per_prompt(lambda values: torch.softmax(values / temperature, dim=0), rewards, prompts)


def percentile_weights(rewards: torch.Tensor, percentile: float, prompts: list[str] | None = None) -> torch.Tensor:
    """RWR-sparse's weights (N,) float64: 1/K for the K samples whose reward is at or above the `percentile`-th
    percentile of all rewards, or of their prompt's with `prompts` (linear interpolation, ties kept), 0 for the
    rest; they sum to 1."""
    import torch

    keep = _per_prompt(lambda values: (values >= torch.quantile(values, percentile / 100)).to(torch.float64),
                       rewards, prompts) > 0
    return keep.to(torch.float64) / keep.sum()


class RegressionOptions(ddpo.Options):
    """What RWR and RWR-sparse share."""

    guided_loss: bool = True
    """Regress the guided prediction eps_u + w (eps_c - eps_u), w = sample.guidance_scale (the official code's
    train_cfg); false: the conditional prediction alone. Unconditional models have no guidance either way."""
    per_prompt: bool = False
    """Compare each sample with its own prompt's samples only (the weights' softmax, or the percentile)."""
    images_per_prompt: int = pydantic.Field(1, ge=1)
    """Images sampled per prompt, each from its own noise (the official sparse configs: a batch per prompt)."""


class RewardWeightedRegression(ddpo.Algorithm):
    """RWR: the denoising loss on the final samples, weighted by softmax(reward / temperature) (Black et al. 2023)."""

    name = "rwr"
    needs_log_probs = False
    run_defaults = {
        "epochs": 10,
        "sample": {"batches_per_epoch": 10240 // (PAPER_PROCESSES * PAPER_BATCH)},
        "train": {"inner_epochs": 5},
    }
    # The digits demo keeps its 30 epochs of 64 samples. Its rewards are probabilities in [0, 1]: at temperature 5 the
    # weights are nearly uniform (ESS ~ 64), at 0.1 they pick the few samples that read as the target. The denoising
    # loss at the demo's learning rate 1e-3 wrecked the model in one epoch; 3e-4 with 2 passes per epoch lifted
    # target 3 from ~0.05 to 0.6-0.7 in 10 epochs (seeds 0-2) and to ~0.95 in 20-30 (seeds 0, 1; tests/test_rwr.py).
    model_run_defaults = {
        "digits": {
            "epochs": 30,
            "sample": {"batches_per_epoch": 2},
            "train": {"batch_size": 32, "inner_epochs": 2, "learning_rate": 3e-4},
            "algorithm": {"name": "rwr", "temperature": 0.1},
        },
    }

    class Options(RegressionOptions):
        temperature: float = pydantic.Field(5.0, gt=0)
        """Softmax temperature of the weights exp(r / temperature) (paper's code: 5); scale it with the rewards."""

    def group_size(self) -> int:
        return self.options.images_per_prompt

    def shares_group_noise(self) -> bool:
        return False

    def weights(self, gathered_rewards: torch.Tensor, gathered_prompts: list[str] | None) -> torch.Tensor:
        """Each sample's weight (N,) float64 over all processes' samples; they sum to 1."""
        prompts = gathered_prompts if self.options.per_prompt else None
        return softmax_weights(gathered_rewards, self.options.temperature, prompts)

    def weight_statistics(self, weights: torch.Tensor) -> dict[str, float]:
        """`rwr/effective_sample_size` 1/sum(w^2): how many samples the weights really train on."""
        return {"rwr/effective_sample_size": float(1 / (weights**2).sum())}

    def update(self, run, trajectory):
        import torch

        from ddpo.core.math.policy import EpochStatistics

        config = run.config
        weights = self.weights(run.gathered_rewards, run.gathered_prompts)
        guidance_scale = config.sample.guidance_scale if self.options.guided_loss else 1.0
        device = trajectory.latents.device
        # N w_i, so that a minibatch's mean, averaged over minibatches and processes, is sum_i w_i l_i.
        scaled = (len(weights) * run.local_part(weights)).to(device, torch.float32)
        final_samples = trajectory.latents[:, -1]
        batch_size = config.train.batch_size
        minibatches = trajectory.batch_size // batch_size
        accumulator = run.accumulator(config.train.grad_accum)
        statistics = EpochStatistics()
        total = config.train.inner_epochs * minibatches
        with run.progress(total, f"epoch {run.epoch}/{config.epochs} training") as bar:
            for inner_epoch in range(config.train.inner_epochs):
                generator = run.generator(f"train-{inner_epoch}")
                order = torch.randperm(trajectory.batch_size, generator=generator).to(device)
                for start in range(0, minibatches * batch_size, batch_size):
                    rows = order[start:start + batch_size]
                    # Zero-weight samples add nothing: skip their forward pass, but keep one row so that every
                    # process runs a backward pass (gradient sync) even when none of its samples is weighted.
                    weighted = rows[scaled[rows] > 0]
                    rows = weighted if len(weighted) else rows[:1]
                    with accumulator.micro_step():
                        embeds = trajectory[rows].prompt_embeds  # a tensor, a dict of them (SDXL, SD3) or None
                        losses = run.model.denoising_loss(final_samples[rows], embeds, generator, guidance_scale)
                        loss = (scaled[rows] * losses).sum() / batch_size
                        accumulator.backward(loss)
                    statistics.add({"loss/policy": loss.item()})
                    bar.update(1)
        accumulator.check_finished()
        summary = statistics.summary(accumulator)
        # This process's mean is P times its share of sum_i w_i l_i; the mean over processes is the whole sum.
        local_loss = torch.tensor([summary["loss/policy"]], device=run.accelerator.device)
        summary["loss/policy"] = summary["loss/total"] = run.accelerator.gather(local_loss).mean().item()
        return {**summary, **self.weight_statistics(weights)}


class SparseRewardWeightedRegression(RewardWeightedRegression):
    """RWR-sparse: the unweighted denoising loss on the samples at or above a reward percentile (Black et al. 2023)."""

    name = "rwr-sparse"
    run_defaults = {  # 10,240 sampled of which the 90th percentile keeps the paper's 1,024
        "epochs": 10,
        "sample": {"batches_per_epoch": 10240 // (PAPER_PROCESSES * PAPER_BATCH)},
        "train": {"inner_epochs": 50},
    }
    model_run_defaults = {  # as RWR's; the 90th percentile of 64 samples keeps about 7
        "digits": {"epochs": 30, "sample": {"batches_per_epoch": 2},
                   "train": {"batch_size": 32, "inner_epochs": 2, "learning_rate": 3e-4}},
    }

    class Options(RegressionOptions):
        percentile: float = pydantic.Field(90.0, gt=0, lt=100)
        """Train on the samples whose reward is at or above this percentile of the epoch's rewards (paper: 90)."""

    def weights(self, gathered_rewards: torch.Tensor, gathered_prompts: list[str] | None) -> torch.Tensor:
        prompts = gathered_prompts if self.options.per_prompt else None
        return percentile_weights(gathered_rewards, self.options.percentile, prompts)

    def weight_statistics(self, weights: torch.Tensor) -> dict[str, float]:
        """`rwr/kept`: how many samples of all processes are trained on."""
        return {**super().weight_statistics(weights), "rwr/kept": float((weights > 0).sum())}


@ddpo.hookimpl
def register_algorithms(register):
    register(RewardWeightedRegression)
    register(SparseRewardWeightedRegression)
