"""AWM: Advantage Weighted Matching (Xue, Ge, Zhang, Li, Ma 2025, arXiv 2509.25050; official code
scxue/advantage_weighted_matching, read at commit be51372).

The paper reads DDPO as score matching on noisy targets (the sampler's own next state) and replaces that target
with the clean one: the model's pretraining loss, flow matching, on the final samples x_0 re-noised at the
sampler's times, weighted by the advantage. Only final samples, rewards and the old policy's loss are needed, so
rollouts may use any sampler, the ODE included (no SDE, no per-step log-probabilities).

For each sample, K = `train_timesteps` times are drawn from its sampling schedule, one per stratum of the first
int(T · train.timestep_fraction) steps (`time_sampling` "discrete" from step 0, "discrete_wo_init" from step 1;
scripts/train_sd3_awm.py:1172-1205, strata boundaries linspace(start, int(T·fraction), K+1)), each with fresh
noise ε drawn once per epoch, and the matching "log-likelihood" at x_t = forward process at t:

    e_θ   = mean over elements of (f_θ(x_t, t, c) − target)²          target = ε − x_0 for flow matching (the
                                                                       scheduler's epsilon/v/x_0 otherwise)
    ℓ_θ   = −e_θ                                         weighting "uniform"
          = −e_θ · s                                                   "t"      (s = t / num_train_timesteps,
          = −((e_θ + 1e-10)^p − 1e-10^p) · s / p                       "ghuber"  = σ for flow matching)
    ρ     = exp(ℓ_θ − ℓ_old)                             per (sample, time): the official "exp_first"
    L     = mean(max(−Â ρ, −Â clip(ρ, 1 − ε, 1 + ε))) + β · mean((f_θ − f_ref)²)
    Â     = clip(A, ±advantage.clip_max) · advantage_max / advantage.clip_max

(train_sd3_awm.py:210-252 compute_log_prob_awm, in float64; :1293-1328 the advantage scaling and the clipped
surrogate; :1330-1337 the "Uniform" KL to the pretrained model, the LoRA adapters off). A = group-relative
advantages: per prompt string with the epoch's global std in the official configs (`per_prompt_stat_tracking`,
`global_std`, train_sd3_awm.py:1013-1041, config/dgx_awm.py:72). ℓ_old is the policy before the epoch's first
optimizer step (train_sd3_awm.py:1117-1240): the samples of that step use their own detached ℓ_θ (ρ = 1, as the
official on-policy path, :1285-1287), the others get a forward pass before training. With one optimizer step per
epoch, as every official config (gradient_accumulation_steps = all minibatches, dgx_awm.py:52), ρ is 1 and the
gradient is Â ∇e_θ weighted: the advantage-weighted flow-matching loss.

Defaults (config/base_awm.py and config/dgx_awm.py `pickscore_sd3_no_cfg_1node`, :309-377): K 6, time_sampling
"discrete" (GenEval and OCR: "discrete_wo_init"), weighting "ghuber" with p 0.25, clip range 1, advantage_max 1
over advantage.clip_max 5 (base_awm.py:91), β 1e-4 for PickScore (0.001 GenEval, :55; base default 0), lr 3e-4,
timestep_fraction 0.9, 14 ODE steps (noise_level 0) without CFG. Differences: the official draws the K times once
per minibatch, here per sample (the same strata and expectation); its TRPO-like second KL, to an EMA of the policy
whose decay ramps to 0.3 (`ema_beta` 1, :65-68), is not implemented; its SA-Solver rollouts are the model's own
sampler here (the flow ODE is the Euler step at `sample.eta` 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

if TYPE_CHECKING:
    import torch

GHUBER_EPSILON = 1e-10
"""The generalised Huber weighting's offset inside the power (train_sd3_awm.py:249)."""


def matching_log_likelihood(error: torch.Tensor, time_fraction: torch.Tensor, weighting: str,
                            power: float) -> torch.Tensor:
    """AWM's weighted matching log-likelihood ℓ (N,) from per-sample mean squared errors e (N,) and times
    s = t / num_train_timesteps (N,) (σ for flow matching); `weighting` uniform, t or ghuber (power p)."""
    if weighting == "uniform":
        return -error
    if weighting == "t":
        return -error * time_fraction
    if weighting == "ghuber":
        return -((error + GHUBER_EPSILON) ** power - GHUBER_EPSILON**power) * time_fraction / power
    raise ValueError(f"unknown weighting '{weighting}'; valid: uniform, t, ghuber")


def matching_step_indices(num_steps: int, fraction: float, count: int, batch_size: int, skip_first: bool,
                          generator: torch.Generator) -> torch.Tensor:
    """(B, K) int64 indices into each sample's sampling schedule: one uniformly drawn step per stratum of
    linspace(start, int(num_steps · fraction), K + 1) truncated to integers, start 1 with `skip_first` else 0."""
    import torch

    last = int(num_steps * fraction)
    start = 1 if skip_first else 0
    if last <= start:
        raise UsageError(f"algorithm 'awm' draws its times from the first int(sample.num_steps x "
                              f"train.timestep_fraction) = {last} steps{' after the first' if skip_first else ''}: "
                              "none left; raise sample.num_steps or train.timestep_fraction")
    boundaries = torch.linspace(start, last, count + 1).long()
    lower, upper = boundaries[:-1], boundaries[1:]
    return lower + (torch.rand(batch_size, count, generator=generator) * (upper - lower)).long()


@dataclass
class Matching:
    """The matching loss of N re-noised final samples."""

    log_likelihood: torch.Tensor
    """ℓ (N,) float64, the weighted negative matching error."""
    error: torch.Tensor
    """e (N,) float64, the mean squared error of the prediction."""
    output: torch.Tensor
    """(N, C, H, W) float32, the model's prediction."""
    noisy: torch.Tensor
    """(N, C, H, W) float32, x_t: the final samples re-noised."""



class AdvantageWeightedMatching(ddpo.Algorithm):
    """AWM: the flow-matching loss on re-noised final samples, weighted by advantages in a PPO-clipped ratio."""

    name = "awm"
    needs_log_probs = False
    run_defaults = {"sample": {"eta": 0.0}, "train": {"learning_rate": 3e-4, "timestep_fraction": 0.9}}
    # On digits: DDIM at eta 0 (any sampler will do), the demo's 64 samples per epoch (one group: the prompts are all
    # empty), 4 optimizer steps per epoch. Without the KL the samples stopped being digits within 2-3 epochs on 4 of
    # 6 (target, seed) pairs of targets 3/7/8 (legibility 0), as the negative advantages push the matching error up
    # without bound; lr 5e-5 did not learn; the KL to the base model (1.0, in the velocity/noise units of the
    # official "Uniform" KL) kept legibility >= 0.95 and lifted targets 7 and 8 by 0.13-0.26 in 8 epochs
    # (tests/test_awm.py, docs/algorithms/awm.md).
    model_run_defaults = {
        "digits": {
            "epochs": 8,
            "algorithm": {"name": "awm", "group_size": 8, "kl_beta": 1.0},
            "sample": {"batch_size": 32, "batches_per_epoch": 2, "eta": 0.0},
            "train": {"batch_size": 16, "grad_accum": 1, "learning_rate": 2e-4, "timestep_fraction": 1.0},
        },
    }

    class Options(ddpo.Options):
        group_size: int = pydantic.Field(8, ge=2)
        """Images per prompt, each from its own initial noise (official: 24; 8 suits CPU-sized runs)."""
        group_by: Literal["group", "prompt"] = "prompt"
        """What a group is: all the epoch's images of one prompt string (official: per-prompt stat tracking), or
        the images sampled together."""
        global_std: bool = True
        """Divide by the std of the whole epoch's rewards instead of the group's (official configs: True)."""
        train_timesteps: int = pydantic.Field(6, ge=1)
        """K, the times per sample trained each epoch, one per stratum of the trained steps (official: 6)."""
        time_sampling: Literal["discrete", "discrete_wo_init"] = "discrete"
        """Strata over steps 0.. (PickScore) or 1.. (GenEval, OCR: the pure-noise first step left out) of the
        first int(sample.num_steps x train.timestep_fraction) sampling steps."""
        weighting: Literal["uniform", "t", "ghuber"] = "ghuber"
        """Time weighting of the matching error (official: ghuber, the generalised Huber loss times sigma)."""
        ghuber_power: float = pydantic.Field(0.25, gt=0, le=1)
        """p of the ghuber weighting (official: 0.25)."""
        clip_range: float = pydantic.Field(1.0, gt=0)
        """PPO clip range on the matching ratio (official: 1; inactive on-policy)."""
        advantage_max: float = pydantic.Field(1.0, gt=0)
        """Clipped advantages are scaled so that advantage.clip_max becomes this (official: 1 over 5)."""
        kl_beta: float = pydantic.Field(0.0, ge=0)
        """Weight of mean((f_theta - f_ref)^2), the prediction's distance to the pretrained model's (official:
        1e-4 PickScore, 1e-3 GenEval; base default 0); 0 skips the reference pass."""

    def __init__(self, options=None):
        super().__init__(options)
        self.zero_std_groups = 0

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_beta > 0

    def group_size(self) -> int:
        return self.options.group_size

    def shares_group_noise(self) -> bool:
        # With ODE rollouts a group from one initial noise would be one image repeated: no advantage at all.
        return False

    def compute_advantages(self, run, trajectory):
        from ddpo.core.math.advantages import epoch_group_advantages

        advantages, self.zero_std_groups = epoch_group_advantages(run, trajectory, self.options.group_by,
                                                                  self.options.global_std)
        return advantages

    def matching(self, model, final: torch.Tensor, embeds, times: torch.Tensor, noise: torch.Tensor,
                 guidance_scale: float) -> Matching:
        """The matching loss of N final samples (N, C, H, W) re-noised at model times (N,) with noise
        (N, C, H, W), the prediction guided with `guidance_scale`."""
        import torch

        noisy, _, target = model.sampler.noised(final, noise, times)
        output = model.predict_noise(noisy, times, embeds, guidance_scale)
        error = ((output.double() - target.double()) ** 2).flatten(1).mean(dim=1)
        time_fraction = times.to(torch.float64) / model.scheduler.config.num_train_timesteps
        log_likelihood = matching_log_likelihood(error, time_fraction, self.options.weighting,
                                                 self.options.ghuber_power)
        return Matching(log_likelihood, error, output, noisy)

    def loss(self, matching: Matching, old_log_likelihood: torch.Tensor, advantages: torch.Tensor,
             reference_output: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`(total, policy_loss, kl)` for N matched rows: PPO's clipped surrogate of ρ = exp(ℓ_θ − ℓ_old) with
        ℓ_old (N,) and the scaled advantages Â (N,), plus `kl_beta` times the mean squared distance of the
        prediction to the pretrained model's `reference_output` (N, C, H, W) if given (kl None otherwise)."""
        from ddpo.core.math.policy import clipped_surrogate

        policy_loss, _ = clipped_surrogate(matching.log_likelihood, old_log_likelihood, advantages,
                                           self.options.clip_range)
        if reference_output is None:
            return policy_loss, policy_loss, None
        kl = ((matching.output - reference_output) ** 2).flatten(1).mean(dim=1).mean()
        return policy_loss + self.options.kl_beta * kl, policy_loss, kl

    def update(self, run, trajectory):
        import torch

        from ddpo.core.math.policy import EpochStatistics
        from ddpo.core.plugin_api.schema import prompt_embeds_at

        config, options = run.config, self.options
        if trajectory.advantages.ndim != 1:
            raise ValueError(f"awm weights each sample by one advantage; got advantages of shape "
                             f"{tuple(trajectory.advantages.shape)}, expected ({trajectory.batch_size},)")
        device = trajectory.latents.device
        count, samples = options.train_timesteps, trajectory.batch_size
        generator = run.generator("awm-times")
        steps = matching_step_indices(trajectory.timesteps.shape[1], config.train.timestep_fraction, count, samples,
                                      options.time_sampling == "discrete_wo_init", generator).to(device)
        times = trajectory.timesteps.gather(1, steps)  # (B, K)
        final = trajectory.latents[:, -1]
        noise = torch.randn((samples, count, *final.shape[1:]), generator=generator).to(device)
        advantages = trajectory.advantages.double() * options.advantage_max / config.advantage.clip_max
        guidance_scale = config.sample.guidance_scale

        def inputs(rows):
            """The minibatch `rows` (b,) stacked over its K times: b·K rows, sample-major."""
            stacked = rows.repeat_interleave(count)
            return (final[stacked], prompt_embeds_at(trajectory.prompt_embeds, stacked), times[rows].flatten(),
                    noise[rows].flatten(0, 1))

        batch_size = config.train.batch_size
        minibatches = samples // batch_size
        orders = [torch.randperm(samples, generator=run.generator(f"train-{inner_epoch}")).to(device)
                  for inner_epoch in range(config.train.inner_epochs)]
        first_step = orders[0][:min(config.train.grad_accum, minibatches) * batch_size]
        # ℓ_old: the first optimizer step's samples take their own detached ℓ_θ when trained (the weights have not
        # moved yet); the others are computed now, before any step.
        old = torch.zeros((samples, count), dtype=torch.float64, device=device)
        known = torch.ones(samples, dtype=torch.bool, device=device)
        known[first_step] = False
        later_rows = known.nonzero().flatten()
        with torch.no_grad():
            for start in range(0, len(later_rows), batch_size):
                rows = later_rows[start:start + batch_size]
                matching = self.matching(run.model, *inputs(rows), guidance_scale)
                old[rows] = matching.log_likelihood.reshape(-1, count)

        accumulator = run.accumulator(config.train.grad_accum)
        statistics = EpochStatistics()
        total_passes = config.train.inner_epochs * minibatches
        with run.progress(total_passes, f"epoch {run.epoch}/{config.epochs} training") as bar:
            for order in orders:
                for start in range(0, minibatches * batch_size, batch_size):
                    rows = order[start:start + batch_size]
                    with accumulator.micro_step():
                        stacked = inputs(rows)
                        embeds, time_rows = stacked[1:3]
                        matching = self.matching(run.model, *stacked, guidance_scale)
                        fresh = ~known[rows]
                        old[rows[fresh]] = matching.log_likelihood.detach().reshape(-1, count)[fresh]
                        known[rows] = True
                        old_rows = old[rows].flatten()
                        reference = None
                        if options.kl_beta > 0:
                            with torch.no_grad(), run.model.reference():
                                reference = run.model.predict_noise(matching.noisy, time_rows, embeds, guidance_scale)
                        total, policy_loss, kl = self.loss(matching, old_rows,
                                                           advantages[rows].repeat_interleave(count), reference)
                        if kl is not None:
                            statistics.add({"loss/kl": kl, "policy/kl_to_reference": kl})
                        accumulator.backward(total)
                    statistics.add({"loss/policy": policy_loss, "loss/total": total,
                                    "awm/matching_error": matching.error.mean()})
                    statistics.add_ratio(matching.log_likelihood, old_rows, options.clip_range, first_minibatch=False)
                    bar.update(1)
        accumulator.check_finished()
        summary = statistics.summary(accumulator)
        summary.pop("policy/ratio_dev_first")  # ρ = 1 by construction on the first step: nothing to check
        summary["awm/zero_std_groups"] = float(self.zero_std_groups)
        return summary


@ddpo.hookimpl
def register_algorithms(register):
    register(AdvantageWeightedMatching)
