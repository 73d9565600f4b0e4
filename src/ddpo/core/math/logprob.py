"""One stochastic denoising step with the Gaussian log-probability of its outcome (DESIGN.md §7).

Both functions take the scheduler for its noise schedule and configuration only (they do not change its
state) and work on whole batches whose elements may sit at different timesteps. The math runs in float32
whatever the model's dtype. The log-probability is the MEAN over all non-batch elements of
log N(x_{t-1}; mu, sigma_t^2): every published clip range and coefficient is calibrated to that scale.
`prev_sample` is detached, so gradients reach the model only through the mean.

A step whose sigma_t is 0 (eta=0, or the final step of a schedule whose last previous alpha is 1) is
deterministic: its log-probability is undefined and returned as NaN; the rollout keeps such steps out of
training.
"""

from __future__ import annotations

import math

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _as_batch(timestep: int | torch.Tensor) -> torch.Tensor:
    """Timesteps as a 1-D int64 CPU tensor (one entry, or one per batch element)."""
    return torch.as_tensor(timestep).detach().to("cpu", torch.long).reshape(-1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or (1,) values shaped (B|1, 1, ..., 1) to broadcast against `like`, in float32 on its device."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def _predicted_original(scheduler, model_output, sample, alpha_t, clip: bool = True):
    """(x0_hat, eps_hat) from the model output, by the scheduler's prediction type, x0_hat clipped as it says
    (`clip`; a loss on x0_hat turns it off, so that its gradient reaches every element)."""
    config = scheduler.config
    if config.prediction_type == "epsilon":
        original = (sample - (1 - alpha_t).sqrt() * model_output) / alpha_t.sqrt()
        epsilon = model_output
    elif config.prediction_type == "sample":
        original = model_output
        epsilon = (sample - alpha_t.sqrt() * original) / (1 - alpha_t).sqrt()
    elif config.prediction_type == "v_prediction":
        original = alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
        epsilon = alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
    else:
        raise ValueError(f"prediction_type '{config.prediction_type}' is not supported; "
                         "valid: epsilon, sample, v_prediction")
    if getattr(config, "thresholding", False):
        raise ValueError("dynamic thresholding is not supported; set the scheduler's thresholding=False")
    if clip and config.clip_sample:
        original = original.clamp(-config.clip_sample_range, config.clip_sample_range)
    return original, epsilon


def _finish_step(mean, std, prev_sample, generator, out_dtype):
    """Draw x_{t-1} if not given and compute its per-element-mean Gaussian log-density."""
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else mean.device).to(mean.device)
        prev_sample = mean + std * noise
    prev_sample = prev_sample.detach().to(torch.float32)
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    log_prob = -((prev_sample - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - _LOG_SQRT_2PI
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    deterministic = (std <= 0).reshape(-1).expand(log_prob.shape[0])
    log_prob = torch.where(deterministic, torch.full_like(log_prob, float("nan")), log_prob)
    return prev_sample.to(out_dtype), log_prob, mean, std


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A DDIM step with eta, as `DDIMScheduler.step`, plus the log-probability of the step's outcome.

    Args:
        scheduler: a `diffusers.DDIMScheduler` after `set_timesteps`.
        model_output: (B, C, H, W) the model's prediction (after classifier-free guidance).
        timestep: the current timestep, an int or (B,) tensor.
        sample: (B, C, H, W) x_t.
        eta: the DDIM noise weight; 1.0 is as stochastic as DDPM.
        prev_sample: (B, C, H, W) x_{t-1} to score; drawn from the step's Gaussian when None.
        generator: the random generator for drawing x_{t-1}.
        prev_timestep: the timestep the step lands on, an int or (B,) tensor (-1: past the end), as recorded
            when sampling; None: from the scheduler's current schedule (`ddim_previous_timestep`).

    Returns:
        `(prev_sample, log_prob, mean, std)`: x_{t-1} (B, C, H, W) in `sample`'s dtype; log_prob (B,) float32;
        mean (B, C, H, W) float32 (carries the gradient); std (B|1, 1, 1, 1) float32.
    """
    sample32, output32 = sample.to(torch.float32), model_output.to(torch.float32)
    timesteps = _as_batch(timestep)
    previous = (ddim_previous_timestep(scheduler, timesteps) if prev_timestep is None
                else _as_batch(prev_timestep))
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    alpha_t = _per_sample(alphas[timesteps], sample32)
    alpha_prev_values = torch.where(previous >= 0, alphas[previous.clamp(min=0)],
                                    torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32))
    alpha_prev = _per_sample(alpha_prev_values, sample32)

    original, epsilon = _predicted_original(scheduler, output32, sample32, alpha_t)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * epsilon
    mean = alpha_prev.sqrt() * original + direction
    return _finish_step(mean, std, prev_sample, generator, sample.dtype)


def ddim_previous_timestep(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) the timestep a DDIM step from each of `timesteps` lands on under the scheduler's current schedule,
    as `DDIMScheduler.step` computes it (negative past the end)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before stepping")
    return _as_batch(timesteps) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def ddpm_previous_timestep(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) the previous timestep of each entry, as `DDPMScheduler.previous_timestep` (-1 after the last)."""
    timesteps = _as_batch(timesteps)
    if not (scheduler.custom_timesteps or scheduler.num_inference_steps):
        return timesteps - 1
    schedule = scheduler.timesteps.to("cpu", torch.long)
    index = (schedule[None, :] == timesteps[:, None]).long().argmax(dim=1)
    following = torch.cat([schedule, torch.tensor([-1])])
    return following[index + 1]


def ddpm_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ancestral DDPM step, as `DDPMScheduler.step`, plus the log-probability of the step's outcome.

    Arguments and returns as `ddim_step_with_logprob` (no eta: the variance is the scheduler's
    `variance_type`, fixed_small or fixed_large). The step to t=0 adds no noise (std 0, log_prob NaN).
    `prev_timestep` as recorded when sampling; None: from the scheduler's schedule (`ddpm_previous_timestep`).
    """
    variance_type = scheduler.config.variance_type
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large"):
        raise ValueError(f"DDPM variance_type '{variance_type}' is not supported; "
                         "valid: fixed_small, fixed_small_log, fixed_large")
    sample32, output32 = sample.to(torch.float32), model_output.to(torch.float32)
    timesteps = _as_batch(timestep)
    previous = (ddpm_previous_timestep(scheduler, timesteps) if prev_timestep is None
                else _as_batch(prev_timestep))
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    alpha_t = _per_sample(alphas[timesteps], sample32)
    alpha_prev = _per_sample(torch.where(previous >= 0, alphas[previous.clamp(min=0)], torch.tensor(1.0)),
                             sample32)
    step_alpha = alpha_t / alpha_prev
    step_beta = 1 - step_alpha

    original, _ = _predicted_original(scheduler, output32, sample32, alpha_t)
    original_coefficient = alpha_prev.sqrt() * step_beta / (1 - alpha_t)
    sample_coefficient = step_alpha.sqrt() * (1 - alpha_prev) / (1 - alpha_t)
    mean = original_coefficient * original + sample_coefficient * sample32

    if variance_type == "fixed_large":
        std = step_beta.sqrt()
    else:
        variance = ((1 - alpha_prev) / (1 - alpha_t) * step_beta).clamp(min=1e-20)
        std = variance.sqrt() if variance_type == "fixed_small" else torch.exp(0.5 * variance.log())
    std = torch.where(_per_sample(timesteps, sample32) > 0, std, torch.zeros_like(std))
    return _finish_step(mean, std, prev_sample, generator, sample.dtype)


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rectified-flow step as an SDE with the ODE's marginals (Flow-GRPO, DESIGN.md §7), plus the
    log-probability of its outcome.

    With σ = t / num_train_timesteps, σ' the same of the step's target, dt = σ' − σ < 0 and v the velocity:
        std = η sqrt(σ / (1 − σ))            (at σ = 1, where this is infinite, 1 − σ' stands for 1 − σ)
        μ   = x (1 + std² dt / (2σ)) + v (1 + std² (1 − σ) / (2σ)) dt
        x'  = μ + std sqrt(−dt) z
    η = 0 is the scheduler's deterministic Euler step x + v dt.

    Args:
        scheduler: a `diffusers.FlowMatchEulerDiscreteScheduler` (its `sigmas` after `set_timesteps` when
            `prev_timestep` is None; its `num_train_timesteps` always).
        model_output: (B, C, H, W) the velocity v (after guidance).
        timestep: σ · num_train_timesteps, a float or (B,) tensor (the scheduler's `timesteps` entries).
        sample: (B, C, H, W) x at σ.
        noise_level: η.
        prev_sample: as `ddim_step_with_logprob`.
        generator: as `ddim_step_with_logprob`.
        prev_timestep: σ' · num_train_timesteps as recorded when sampling; None: the next entry of the
            scheduler's schedule.

    Returns:
        `(prev_sample, log_prob, mean, std)` as `ddim_step_with_logprob`; `std` is the step's whole standard
        deviation, std_η · sqrt(−dt).
    """
    sample32, output32 = sample.to(torch.float32), model_output.to(torch.float32)
    sigma, sigma_next = _flow_sigmas(scheduler, timestep, prev_timestep, sample32)
    dt = sigma_next - sigma
    sigma_for_std = torch.where(sigma >= 1, sigma_next, sigma)
    std = noise_level * (sigma / (1 - sigma_for_std)).sqrt()
    mean = sample32 * (1 + std**2 * dt / (2 * sigma)) + output32 * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    return _finish_step(mean, std * (-dt).sqrt(), prev_sample, generator, sample.dtype)


def _flow_sigmas(scheduler, timestep, prev_timestep, like):
    """(σ, σ') each (B|1, 1, ..., 1) float32 from timesteps in units of num_train_timesteps; σ' from the
    scheduler's schedule when `prev_timestep` is None."""
    train_steps = scheduler.config.num_train_timesteps
    current = torch.as_tensor(timestep).detach().to("cpu", torch.float32).reshape(-1)
    if prev_timestep is None:
        schedule = (scheduler.sigmas * train_steps).to(torch.float32)
        index = (schedule[None, :-1] - current[:, None]).abs().argmin(dim=1)
        following = schedule[index + 1]
    else:
        following = torch.as_tensor(prev_timestep).detach().to("cpu", torch.float32).reshape(-1)
    return _per_sample(current / train_steps, like), _per_sample(following / train_steps, like)


def dance_grpo_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.3,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DanceGRPO's flow SDE step (`sample.sde=dance-grpo`): Euler–Maruyama on the reverse SDE with a constant
    diffusion η, plus the log-probability of its outcome.

    Source: XueZeyue/DanceGRPO@15cc71d fastvideo/train_grpo_flux.py:131-170 (`flux_step`, `sde_solver=True`;
    the same step is in its other train_grpo_*.py). With σ, σ', dt = σ' − σ < 0 and v as in
    `flow_sde_step_with_logprob`, x̂0 = x − σ v and the score estimate −(x − (1 − σ) x̂0) / σ²:
        std = η sqrt(σ − σ')
        μ   = x + v dt + (η² / 2) (x − (1 − σ) x̂0) / σ² · dt
        x'  = μ + std z
    The drift is v − (η²/2) · score, the reverse SDE of the flow's marginals with g² = η² (Flow-GRPO's has
    g² = η² σ / (1 − σ)); one finite step adds variance, see docs/models.md. η = 0 is the Euler step x + v dt.
    DanceGRPO's scripts pass η = 0.3 (scripts/finetune/finetune_flux_grpo.sh:46; `--eta` has no default);
    the log-probability is the full Gaussian one, as there.

    Arguments and returns as `flow_sde_step_with_logprob`; `std` is the whole step's, η sqrt(σ − σ').
    """
    sample32, output32 = sample.to(torch.float32), model_output.to(torch.float32)
    sigma, sigma_next = _flow_sigmas(scheduler, timestep, prev_timestep, sample32)
    dt = sigma_next - sigma
    original = sample32 - sigma * output32
    mean = sample32 + output32 * dt + 0.5 * noise_level**2 * (sample32 - (1 - sigma) * original) / sigma**2 * dt
    std = noise_level * (-dt).sqrt()
    return _finish_step(mean, std, prev_sample, generator, sample.dtype)


def cps_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    prev_timestep: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The coefficients-preserving sampler (CPS, `sample.sde=cps`), plus the log-probability of its outcome.

    Source: yifan123/flow_grpo@54809b5 flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:70-86 (`sde_type ==
    'cps'`). With σ, σ', v as in `flow_sde_step_with_logprob`, the predicted data x̂0 = x − σ v and noise
    x̂1 = x + (1 − σ) v:
        std = σ' sin(η π / 2)
        μ   = (1 − σ') x̂0 + sqrt(σ'² − std²) x̂1  = (1 − σ') x̂0 + σ' cos(η π / 2) x̂1
        x'  = μ + std z
    so x' = (1 − σ') x̂0 + σ' (cos(ηπ/2) x̂1 + sin(ηπ/2) z): the data and noise coefficients are the flow's at
    σ' and the noise has unit variance when x̂1 is standard normal. η = 0 is the Euler step x + v dt; the last
    step (σ' = 0) has std 0 and is deterministic (log_prob NaN), as every step at η = 0.

    The official code's log-probability drops every constant and the 1 / (2 std²) scale (it is −mean (x' − μ)²);
    ours is the Gaussian density like the other steps, so clip ranges and KL weights keep the scale they have
    for the other samplers. Arguments and returns as `flow_sde_step_with_logprob`; `std` is the whole step's.
    """
    sample32, output32 = sample.to(torch.float32), model_output.to(torch.float32)
    sigma, sigma_next = _flow_sigmas(scheduler, timestep, prev_timestep, sample32)
    original = sample32 - sigma * output32
    noise = sample32 + (1 - sigma) * output32
    angle = noise_level * math.pi / 2
    std = sigma_next * math.sin(angle)
    mean = (1 - sigma_next) * original + sigma_next * math.cos(angle) * noise
    return _finish_step(mean, std, prev_sample, generator, sample.dtype)


FLOW_SDE_STEPS = {
    "flow-grpo": flow_sde_step_with_logprob,
    "dance-grpo": dance_grpo_step_with_logprob,
    "cps": cps_step_with_logprob,
}
"""`sample.sde` value -> its step function (all with `flow_sde_step_with_logprob`'s signature)."""
