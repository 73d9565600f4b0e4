"""What the ratio-based policy-gradient algorithms share: PPO's clipped surrogate over denoising steps and the
statistics they log.

ρ = exp(log p_θ − log p_old) per transition. Right after sampling, before any optimizer step, the policy is the
sampling policy and ρ must be exactly 1: `policy/ratio_dev_first` logs max |ρ − 1| over the epoch's first
minibatch (every trained step of it), before the first optimizer step; a value away from 0 means the
recomputed log-probs do not match the sampled ones, the bug users of other tools report most.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch

from ddpo.core.schema import Transitions


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's loss mean(max(−A ρ, −A clip(ρ, 1 ± ε))) over (B,) transitions; returns `(loss, ratio)`."""
    ratio = torch.exp(log_prob - old_log_prob)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped).mean(), ratio


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL (B,) between N(mean, std²) and N(reference_mean, std²) per element, averaged over elements (the scale of
    the per-element-mean log-probs): mean((mean − reference_mean)² / (2 std²)). `mean`, `reference_mean`
    (B, C, H, W); `std` (B|1, 1, 1, 1)."""
    return ((mean - reference_mean) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


def reference_step(model, transitions, eta: float, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained model's answer for the same transitions, without gradient: `(mean, model_output)` of its
    step (the algorithm must set `needs_reference` so that the trainer prepares the reference)."""
    with torch.no_grad(), model.reference():
        _, mean, _, model_output = model.step_log_prob(transitions, eta, guidance_scale)
    return mean, model_output


def kl_to_reference(model, transitions, mean: torch.Tensor, std: torch.Tensor, sample_config,
                    statistics: EpochStatistics, units: str = "step") -> torch.Tensor:
    """The mean KL (a scalar, with gradient) of the policy's step Gaussians N(mean, std²) to the pretrained
    model's on the same transitions, logged as `loss/kl` and `policy/kl_to_reference`. `sample_config` gives the
    run's eta and guidance scale.

    `units` "step": the exact Gaussian KL per element, mean((μ − μ_ref)²) / (2 std²) with std the step's whole
    standard deviation (DPOK's closed form). "noise-level": Flow-GRPO's (train_sd3.py:895), the same squared mean
    difference over 2 σ², σ the noise level's std without the step's sqrt(|dt|): the exact KL times |dt|
    (`Sampler.step_duration`), equal to it on DDIM and DDPM, whose steps have no dt."""
    reference_mean, _ = reference_step(model, transitions, sample_config.eta, sample_config.guidance_scale)
    kl = gaussian_kl(mean, reference_mean, std)
    if units == "noise-level":
        kl = kl * model.sampler.step_duration(transitions.timesteps, transitions.prev_timesteps).flatten()
    kl = kl.mean()
    statistics.add({"loss/kl": kl.item(), "policy/kl_to_reference": kl.item()}, transitions.positions)
    return kl


class EpochStatistics:
    """Per-micro-step scalars of an update, summarised as epoch means, plus the ratio checks."""

    def __init__(self):
        self.values: dict[str, list[float]] = defaultdict(list)
        self.weights: dict[str, list[float]] = defaultdict(list)
        self.ratio_dev_first = 0.0

    def add(self, tags: dict[str, float], positions: int = 1) -> None:
        """Record one pass's scalars by tag ({"loss/policy": ...}); a pass over `positions` stacked step
        positions counts that many times in the epoch mean, as its positions would one by one."""
        for tag, value in tags.items():
            self.values[tag].append(float(value) * positions)
            self.weights[tag].append(positions)

    def add_ratio(self, log_prob: torch.Tensor, old_log_prob: torch.Tensor, clip_range: float | None,
                  first_minibatch: bool, positions: int = 1) -> None:
        """Record `policy/approx_kl`, `policy/ratio_mean`, `policy/clipfrac` (when there is a clip range) and,
        for a transition of the first minibatch before any optimizer step, `policy/ratio_dev_first`."""
        log_ratio = (log_prob - old_log_prob).detach()
        ratio = log_ratio.exp()
        self.add({"policy/approx_kl": 0.5 * (log_ratio**2).mean().item(), "policy/ratio_mean": ratio.mean().item()},
                 positions)
        if clip_range is not None:
            self.add({"policy/clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item()}, positions)
        if first_minibatch:
            self.ratio_dev_first = max(self.ratio_dev_first, (ratio - 1).abs().max().item())

    def summary(self, accumulator=None) -> dict[str, float]:
        """Epoch means of every tag, `policy/ratio_dev_first` if ratios were recorded, and the accumulator's
        optimizer step count and last gradient norm; `loss/total` defaults to `loss/policy`."""
        summary = {tag: sum(values) / sum(self.weights[tag]) for tag, values in self.values.items()}
        if "policy/ratio_mean" in summary:
            summary["policy/ratio_dev_first"] = self.ratio_dev_first
        if "loss/policy" in summary:
            summary.setdefault("loss/total", summary["loss/policy"])
        if accumulator is not None:
            summary["train/optimizer_steps"] = float(accumulator.optimizer_steps)
            summary["train/grad_norm"] = accumulator.last_grad_norm
        return summary


def add_sampled_gradients(run, trajectory, accumulator, statistics: EpochStatistics,
                          clip_range: float | None) -> int:
    """With `train.gradient_from_sampling`, accumulate the gradient the sampling pass took for the epoch's first
    samples (ddpo.core.onpolicy): -A grad log p for each of their trained steps, as the minibatches they make
    would, with `loss/policy` and the ratio statistics. The loss is PPO's surrogate with `clip_range` (-A at ratio
    1), or DDPO-SF's -A log p if it is None. Returns how many samples it covered (0 without the option); the
    training pass leaves them out of its first inner epoch."""
    sampled = run.sampled_gradients
    if sampled is None:
        return 0
    advantages = trajectory.advantages[:sampled.count]
    if advantages.ndim != 1:
        shape = tuple(trajectory.advantages.shape)
        raise ValueError("train.gradient_from_sampling weights each sample's gradient by one advantage; got "
                         f"advantages of shape {shape}, expected ({trajectory.batch_size},)")
    batch_size = run.config.train.batch_size
    positions = sampled.count // batch_size * trajectory.num_train_steps(1.0)
    accumulator.add_gradients(sampled.parameters, sampled.combine(-advantages / batch_size), positions)
    log_probs = trajectory.log_probs[:sampled.count]
    trained = trajectory.policy_steps[:sampled.count]
    if clip_range is None:
        loss = -(advantages[:, None] * log_probs)[trained].mean().item()
    else:
        loss = -advantages.mean().item()
    statistics.add({"loss/policy": loss, "loss/total": loss}, positions)
    statistics.add_ratio(log_probs[trained], log_probs[trained], clip_range, False, positions)
    return sampled.count


def policy_passes(run, trajectory, accumulator, group_size: int = 1, sampled: int = 0,
                  batch_size: int | None = None) -> Iterator[tuple[Transitions, bool]]:
    """The training loop of the step-wise policy algorithms: `train.inner_epochs` passes over the trajectories in
    DDPO's order (`Trajectory.training_transitions`, a generator per inner epoch), minibatches of `batch_size`
    (default `train.batch_size`), `train.steps_per_pass` step positions of a minibatch stacked per forward pass,
    each inside its accumulator micro-step, with the progress bar. Yields `(transitions, first_minibatch)`,
    `first_minibatch` True before the epoch's first optimizer step; the caller computes the loss and calls
    `accumulator.backward` before asking for the next. The first inner epoch leaves out the first `sampled`
    samples, whose gradient `add_sampled_gradients` accumulated."""
    config = run.config.train
    batch_size = batch_size or config.batch_size
    steps_per_sample = trajectory.num_train_steps(config.timestep_fraction)
    total = (config.inner_epochs * trajectory.batch_size - sampled) // batch_size * steps_per_sample
    with run.progress(total, f"epoch {run.epoch}/{run.config.epochs} training") as bar:
        for inner_epoch in range(config.inner_epochs):
            positions_done = 0
            trained = trajectory[sampled:] if inner_epoch == 0 and sampled else trajectory
            if not trained.batch_size:
                continue
            for transitions in trained.training_transitions(
                    batch_size, run.generator(f"train-{inner_epoch}"), config.timestep_fraction,
                    group_size=group_size, steps_per_pass=config.steps_per_pass, selection=config.timestep_selection):
                first_minibatch = inner_epoch == 0 and not sampled and positions_done < steps_per_sample
                with accumulator.micro_step(transitions.positions):
                    yield transitions, first_minibatch
                positions_done += transitions.positions
                bar.update(transitions.positions)
    accumulator.check_finished()
