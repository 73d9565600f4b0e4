"""Samplers: a schedule of steps, and one Gaussian step with the log-probability of its outcome, computed from
what the trajectory recorded for that step (its timestep and the one it lands on), never from a scheduler's
mutable state.

Three kinds wrap diffusers' schedulers, which give the schedules (and, for flow matching, the shift):
DDIM with eta, DDPM ancestral steps, and a flow-matching SDE (eta is its noise level): Flow-GRPO's, DanceGRPO's or
the coefficients-preserving sampler, by `sample.sde`. The step
math is in `ddpo.core.math.logprob`. A sampler also says how the model is trained to denoise (`denoising_target`),
for the regression losses (RWR), the forward process at chosen times (`noised`: AWM, DiffusionNFT), and which clean
state a model output implies (`predicted_original`: DiffusionNFT).
"""

from __future__ import annotations

import numpy as np
import torch

from ddpo.core.math.logprob import (
    _predicted_original,
    ddim_previous_timestep,
    ddim_step_with_logprob,
    ddpm_previous_timestep,
    ddpm_step_with_logprob,
    FLOW_SDE_STEPS,
)


class Sampler:
    """A sampler around a diffusers scheduler (`self.scheduler`)."""

    kind = ""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def init_noise_sigma(self) -> float:
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def set_timesteps(self, num_steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The schedule for `num_steps` steps: `(timesteps, prev_timesteps)`, each (T,), first step first; the
        model's time input of each step and the time the step lands on (-1 past the end for DDIM/DDPM)."""
        self.scheduler.set_timesteps(num_steps)
        timesteps = self.scheduler.timesteps
        return timesteps.to(device), self._previous(timesteps).to(device)

    def _previous(self, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, model_output, timesteps, prev_timesteps, sample, eta, prev_sample=None, generator=None):
        """One step with its log-probability: `(prev_sample, log_prob, mean, std)` (see `ddpo.core.math.logprob`);
        steps with std 0 are deterministic (log_prob NaN) and never trained on."""
        raise NotImplementedError

    def step_duration(self, timesteps: torch.Tensor, prev_timesteps: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) the factor by which each step's variance exceeds its noise level's: 1 for DDIM and DDPM,
        whose std is the step's own; |dt| for the flow SDE, whose step std is its noise level's times sqrt(|dt|)."""
        return torch.ones(timesteps.shape[0], 1, 1, 1, device=timesteps.device)

    def denoising_target(self, original: torch.Tensor, noise: torch.Tensor,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the model's own training loss on clean states x_0: `(noisy, timesteps, target)`, a uniformly
        drawn time per sample, x_t at it, and what the model should predict there."""
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (original.shape[0],),
                                  generator=generator)
        return self.noised(original, noise, timesteps.to(original.device))

    def noised(self, original: torch.Tensor, noise: torch.Tensor,
               timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The forward process at chosen times: `(noisy, timesteps, target)` for clean states x_0 (B, C, H, W),
        noise (B, C, H, W) and model times (B,) (as the trajectory records them), x_t and what the model should
        predict there. For the losses on re-noised final samples at the sampler's own times (AWM,
        DiffusionNFT)."""
        config = self.scheduler.config
        noisy = self.scheduler.add_noise(original, noise, timesteps)
        if config.prediction_type == "epsilon":
            target = noise
        elif config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(original, noise, timesteps)
        elif config.prediction_type == "sample":
            target = original
        else:
            raise ValueError(f"prediction_type '{config.prediction_type}' is not supported; "
                             "valid: epsilon, v_prediction, sample")
        return noisy, timesteps, target

    def predicted_original(self, model_output: torch.Tensor, noisy: torch.Tensor,
                           timesteps: torch.Tensor) -> torch.Tensor:
        """x̂_0 (B, C, H, W) float32 that the model output (B, C, H, W) at x_t `noisy` and `timesteps` (B,) implies,
        by the scheduler's prediction type (epsilon: (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)), never clipped."""
        alphas = self.scheduler.alphas_cumprod.to(torch.float32)[timesteps.detach().to("cpu", torch.long)]
        alpha_t = alphas.to(noisy.device).reshape(-1, *([1] * (noisy.ndim - 1)))
        original, _ = _predicted_original(self.scheduler, model_output.to(torch.float32), noisy.to(torch.float32),
                                          alpha_t, clip=False)
        return original


class DDIMSampler(Sampler):
    """DDIM with eta (1.0: as stochastic as DDPM; 0: deterministic, no log-probs)."""

    kind = "ddim"

    def _previous(self, timesteps):
        return ddim_previous_timestep(self.scheduler, timesteps).clamp(min=-1)

    def step(self, model_output, timesteps, prev_timesteps, sample, eta, prev_sample=None, generator=None):
        return ddim_step_with_logprob(self.scheduler, model_output, timesteps, sample, eta=eta,
                                      prev_sample=prev_sample, generator=generator, prev_timestep=prev_timesteps)


class DDPMSampler(Sampler):
    """DDPM ancestral steps (the variance is the scheduler's; eta is ignored)."""

    kind = "ddpm"

    def _previous(self, timesteps):
        return ddpm_previous_timestep(self.scheduler, timesteps)

    def step(self, model_output, timesteps, prev_timesteps, sample, eta, prev_sample=None, generator=None):
        return ddpm_step_with_logprob(self.scheduler, model_output, timesteps, sample, prev_sample=prev_sample,
                                      generator=generator, prev_timestep=prev_timesteps)


class FlowSDESampler(Sampler):
    """Rectified-flow models (SD3, FLUX): the ODE's Euler schedule from `FlowMatchEulerDiscreteScheduler`
    (shift included), stepped as the SDE `sde` names (`sample.sde`: flow-grpo, Flow-GRPO's SDE with the ODE's
    marginals; dance-grpo; cps); eta is its noise level (0.7 in Flow-GRPO; 0 is the deterministic Euler step).
    Timesteps are floats, sigma x num_train_timesteps."""

    kind = "flow-sde"

    def __init__(self, scheduler, sde: str = "flow-grpo"):
        super().__init__(scheduler)
        if sde not in FLOW_SDE_STEPS:
            raise ValueError(f"unknown flow SDE '{sde}'; valid: {', '.join(FLOW_SDE_STEPS)}")
        self.sde = sde

    def _previous(self, timesteps):
        sigmas = self.scheduler.sigmas.to(torch.float32)
        return sigmas[1:len(timesteps) + 1] * self.scheduler.config.num_train_timesteps

    def step(self, model_output, timesteps, prev_timesteps, sample, eta, prev_sample=None, generator=None):
        return FLOW_SDE_STEPS[self.sde](self.scheduler, model_output, timesteps, sample, noise_level=eta,
                                        prev_sample=prev_sample, generator=generator, prev_timestep=prev_timesteps)

    def step_duration(self, timesteps, prev_timesteps):
        """|dt| for flow-grpo and dance-grpo, whose step std is the noise level's times sqrt(|dt|); 1 for cps,
        whose std (sigma' sin(eta pi / 2)) is the step's own, as Flow-GRPO's KL divides by it."""
        if self.sde == "cps":
            return super().step_duration(timesteps, prev_timesteps)
        scale = self.scheduler.config.num_train_timesteps
        return ((timesteps.float() - prev_timesteps.float()) / scale).abs().reshape(-1, 1, 1, 1)

    def denoising_target(self, original, noise, generator):
        """Flow matching: x_σ = (1 − σ) x_0 + σ noise with σ uniform, target velocity noise − x_0."""
        sigma = torch.rand(original.shape[0], generator=generator).to(original.device)
        return self.noised(original, noise, sigma * self.scheduler.config.num_train_timesteps)

    def noised(self, original, noise, timesteps):
        """Flow matching at σ = timesteps / num_train_timesteps: x_σ = (1 − σ) x_0 + σ noise, target noise − x_0."""
        sigma = timesteps.to(original.dtype) / self.scheduler.config.num_train_timesteps
        shaped = sigma.reshape(-1, *([1] * (original.ndim - 1)))
        noisy = (1 - shaped) * original + shaped * noise
        return noisy, timesteps, noise - original


    def predicted_original(self, model_output, noisy, timesteps):
        """x̂_0 = x_σ − σ v: the clean end of the straight path through x_σ with velocity v."""
        sigma = timesteps.to(noisy.device, torch.float32) / self.scheduler.config.num_train_timesteps
        return noisy.to(torch.float32) - sigma.reshape(-1, *([1] * (noisy.ndim - 1))) * model_output.to(torch.float32)


class FluxSampler(FlowSDESampler):
    """The flow SDE on FluxPipeline's schedule: sigmas linspace(1, 1/n, n), shifted by `mu` (the image sequence
    length's) when the scheduler shifts dynamically (FLUX.1-dev), by its fixed `shift` otherwise (schnell)."""

    def __init__(self, scheduler, image_seq_len: int):
        super().__init__(scheduler)
        config = scheduler.config
        self.mu = None
        if config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            self.mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                      config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                      config.get("max_shift", 1.15))

    def set_timesteps(self, num_steps, device):
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=self.mu)
        timesteps = self.scheduler.timesteps
        return timesteps.to(device), self._previous(timesteps).to(device)


SAMPLERS = {sampler.kind: sampler for sampler in (DDIMSampler, DDPMSampler, FlowSDESampler)}
