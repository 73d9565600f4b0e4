"""What the ratio-based policy-gradient algorithms share: the training pass over denoising steps (`policy_update`:
inner epochs x minibatches x step positions, the gradient accumulator, the statistics, the first-minibatch ratio
check), PPO's clipped surrogate, the KL to the pretrained model, and the statistics they log. An algorithm hands
`policy_update` its loss and keeps nothing else of the loop.

ρ = exp(log p_θ − log p_old) per transition. Right after sampling, before any optimizer step, the policy is the
sampling policy and ρ must be 1 (exactly, in the sampling batch; to float32 rounding in a batch of another size):
`policy/ratio_dev_first` logs max |ρ − 1| over the epoch's first minibatch (every trained step of it), before
the first optimizer step; a value away from 0 means the recomputed log-probs do not match the sampled ones, the
bug users of other tools report most.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from ddpo.core.optim import POLICY
from ddpo.core.schema import Transitions

ROW = "policy/row"
"""The `extras` key under which `policy_update` numbers the trajectories it trains (B,), so that a transition
knows its trajectory row and the reference cache its entry."""


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
                    statistics: EpochStatistics, units: str = "step",
                    reference_mean: torch.Tensor | None = None) -> torch.Tensor:
    """The mean KL (a scalar, with gradient) of the policy's step Gaussians N(mean, std²) to the pretrained
    model's on the same transitions, logged as `loss/kl` and `policy/kl_to_reference`. `sample_config` gives the
    run's eta and guidance scale; `reference_mean` (B, C, H, W), the pretrained model's step mean if the caller
    has it (`PolicyStep.reference`), saves its pass.

    `units` "step": the exact Gaussian KL per element, mean((μ − μ_ref)²) / (2 std²) with std the step's whole
    standard deviation (DPOK's closed form). "noise-level": Flow-GRPO's (train_sd3.py:895), the same squared mean
    difference over 2 σ², σ the noise level's std without the step's sqrt(|dt|): the exact KL times |dt|
    (`Sampler.step_duration`), equal to it on DDIM and DDPM, whose steps have no dt."""
    if reference_mean is None:
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

    def add(self, tags: dict[str, float | torch.Tensor], positions: int = 1) -> None:
        """Record one pass's scalars (floats or one-element tensors) by tag ({"loss/policy": ...}); a pass over
        `positions` stacked step positions counts that many times in the epoch mean, as its positions would one by
        one."""
        for tag, value in tags.items():
            self.values[tag].append((value.item() if isinstance(value, torch.Tensor) else float(value)) * positions)
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
                  batch_size: int | None = None, temporal: bool = False,
                  once: bool = False) -> Iterator[tuple[Transitions, bool]]:
    """The training loop of the step-wise policy algorithms: `train.inner_epochs` passes over the trajectories in
    DDPO's order (`Trajectory.training_transitions`, a generator per inner epoch), minibatches of `batch_size`
    (default `train.batch_size`), `train.steps_per_pass` step positions of a minibatch stacked per forward pass,
    each inside its accumulator micro-step, with the progress bar. Yields `(transitions, first_minibatch)`,
    `first_minibatch` True for the epoch's first minibatch before the epoch's first optimizer step; the caller
    computes the loss and calls `accumulator.backward` before asking for the next. The first inner epoch leaves out
    the first `sampled` samples, whose gradient `add_sampled_gradients` accumulated.

    `temporal` (TDPO's order): for each step position, every minibatch, one position per pass; every pass before
    the first optimizer step is a first-minibatch one. `once` (DDPO-SF, on-policy): one pass whatever
    `train.inner_epochs`, ordered by the "train" stream."""
    config = run.config.train
    batch_size = batch_size or config.batch_size
    inner_epochs = 1 if once else config.inner_epochs
    steps_per_sample = trajectory.num_train_steps(config.timestep_fraction)
    total = (inner_epochs * trajectory.batch_size - sampled) // batch_size * steps_per_sample
    with run.progress(total, f"epoch {run.epoch}/{run.config.epochs} training") as bar:
        for inner_epoch in range(inner_epochs):
            positions_done = 0
            trained = trajectory[sampled:] if inner_epoch == 0 and sampled else trajectory
            if not trained.batch_size:
                continue
            for transitions in trained.training_transitions(
                    batch_size, run.generator("train" if once else f"train-{inner_epoch}"), config.timestep_fraction,
                    group_size=group_size, steps_outer=temporal, steps_per_pass=config.steps_per_pass,
                    selection=config.timestep_selection):
                first_minibatch = (inner_epoch == 0 and accumulator.optimizer_steps == 0
                                   and (temporal or positions_done < steps_per_sample))
                with accumulator.micro_step(transitions.positions):
                    yield transitions, first_minibatch
                positions_done += transitions.positions
                bar.update(transitions.positions)
    accumulator.check_finished()


@dataclass
class ReferenceStep:
    """The pretrained model's step on some transitions, without gradient: the entries `policy_update` was asked for
    (`reference=`), None for the others. `log_prob` (B,), `mean` and `model_output` (B, C, H, W)."""

    log_prob: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    model_output: torch.Tensor | None = None


class ReferenceSteps:
    """The pretrained model's steps on the transitions of a training pass, each kept per trajectory row and step
    when the pass visits it again (`train.inner_epochs` > 1), so that the frozen reference runs once per
    transition, not once per visit. Only the named `entries` are kept: log-probs cost (B, T), means or model
    outputs a state each, (B, T, C, H, W). Lives for one update: checkpoints never hold it, so a resumed run
    computes what the uninterrupted one did."""

    def __init__(self, model, sample_config, entries: tuple[str, ...], shape: tuple[int, int], keep: bool):
        self.model, self.sample_config, self.entries, self.keep = model, sample_config, entries, keep
        self.shape = shape
        """(B, T): the trained trajectories and their steps."""
        self.kept: dict[str, torch.Tensor] = {}
        self.filled: torch.Tensor | None = None

    def __call__(self, transitions: Transitions) -> ReferenceStep:
        rows = transitions.extras.get(ROW)
        if self.keep and rows is not None and self.filled is not None:
            where = (rows.to(self.filled.device), transitions.steps.to(self.filled.device))
            if bool(self.filled[where].all()):
                return ReferenceStep(**{name: self.kept[name][where] for name in self.entries})
        with torch.no_grad(), self.model.reference():
            log_prob, mean, _, model_output = self.model.step_log_prob(transitions, self.sample_config.eta,
                                                                       self.sample_config.guidance_scale)
        step = ReferenceStep(**{name: value for name, value in
                                (("log_prob", log_prob), ("mean", mean), ("model_output", model_output))
                                if name in self.entries})
        if self.keep and rows is not None:
            self._store(rows, transitions.steps, step)
        return step

    def _store(self, rows: torch.Tensor, steps: torch.Tensor, step: ReferenceStep) -> None:
        for name in self.entries:
            value = getattr(step, name)
            if name not in self.kept:
                self.kept[name] = value.new_zeros((*self.shape, *value.shape[1:]))
                self.filled = torch.zeros(self.shape, dtype=torch.bool, device=value.device)
            self.kept[name][rows.to(value.device), steps.to(value.device)] = value
        self.filled[rows.to(self.filled.device), steps.to(self.filled.device)] = True


class PolicyStep:
    """The policy's step on a pass's transitions, with gradient: `log_prob` (B,), `mean` (B, C, H, W), `std`
    (B|1, 1, 1, 1), `model_output` (B, C, H, W) after guidance (`Model.step_log_prob`); and `reference()`, the
    pretrained model's step on the same transitions (cached per trajectory step, see `ReferenceSteps`)."""

    def __init__(self, transitions: Transitions, outputs: tuple, references: ReferenceSteps | None):
        self.log_prob, self.mean, self.std, self.model_output = outputs
        self._transitions, self._references = transitions, references
        self._reference: ReferenceStep | None = None

    def reference(self) -> ReferenceStep:
        """The pretrained model's step, computed on first use (so that the loss decides where its pass runs)."""
        if self._references is None:
            raise RuntimeError("the loss asks for the reference; call policy_update with reference=(the entries)")
        if self._reference is None:
            self._reference = self._references(self._transitions)
        return self._reference


PolicyLoss = Callable[[Transitions, PolicyStep], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]
"""An algorithm's loss: `(transitions, policy step) -> (loss, tags)`, a scalar with gradient and the scalars to log
for it by tag (e.g. {"loss/policy": ..., "loss/total": ...})."""


def policy_update(run, trajectory, loss: PolicyLoss, *, clip_range: float | None = None,
                  reference: tuple[str, ...] = (), statistics: EpochStatistics | None = None, group_size: int = 1,
                  batch_size: int | None = None, temporal: bool = False, once: bool = False,
                  modules: tuple[str, ...] = (POLICY,)) -> dict[str, float]:
    """One update of a step-wise policy algorithm: for each pass of `policy_passes` (inner epochs x minibatches x
    step positions, in DDPO's order; `temporal`, `once` and `group_size` as there), the policy's step on the
    transitions (the run's eta and guidance), `loss(transitions, step)`, its backward pass, its tags and the ratio
    statistics (`clip_range` for the clip fraction; None: no clip). Returns the epoch's summary.

    An optimizer step of the `modules` takes `train.grad_accum` minibatches with every trained step of them, or
    `train.grad_accum` minibatches at one step position (`temporal`), or the whole epoch (`once`). With
    `train.gradient_from_sampling` the first samples' gradient comes from the sampling pass (`add_sampled_gradients`;
    its loss at ratio 1 is PPO's surrogate, or -A log p without `clip_range`). `reference` names the entries of
    the pretrained model's step the loss reads (`PolicyStep.reference()`: "log_prob", "mean", "model_output"), kept
    per trajectory step across inner epochs. `statistics` adds to the caller's (e.g. a value fit's losses)."""
    config = run.config
    steps_per_sample = trajectory.num_train_steps(config.train.timestep_fraction)
    batch_size = batch_size or config.train.batch_size
    if once:
        micro_steps = trajectory.batch_size // batch_size * steps_per_sample
    else:
        micro_steps = config.train.grad_accum * (1 if temporal else steps_per_sample)
    accumulator = run.accumulator(micro_steps, modules=modules)
    statistics = statistics if statistics is not None else EpochStatistics()
    sampled = add_sampled_gradients(run, trajectory, accumulator, statistics, clip_range)
    references = None
    if reference:
        revisits = not once and config.train.inner_epochs > 1
        if revisits:
            extras = {**trajectory.extras, ROW: torch.arange(trajectory.batch_size, device=trajectory.latents.device)}
            trajectory = replace(trajectory, extras=extras)
        references = ReferenceSteps(run.model, config.sample, reference,
                                    (trajectory.batch_size, trajectory.num_steps), keep=revisits)
    for transitions, first_minibatch in policy_passes(run, trajectory, accumulator, group_size, sampled, batch_size,
                                                      temporal=temporal, once=once):
        step = PolicyStep(transitions, run.model.step_log_prob(transitions, config.sample.eta,
                                                               config.sample.guidance_scale), references)
        total, tags = loss(transitions, step)
        accumulator.backward(total)
        statistics.add(tags, transitions.positions)
        statistics.add_ratio(step.log_prob, transitions.log_probs, clip_range, first_minibatch, transitions.positions)
    return statistics.summary(accumulator)
