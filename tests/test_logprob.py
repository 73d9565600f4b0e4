"""The log-prob step functions against diffusers' own schedulers and a float64 hand computation."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddpo.core.math.logprob import ddim_step_with_logprob, ddpm_step_with_logprob

SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)


def ddim(prediction_type="epsilon", **overrides):
    scheduler = DDIMScheduler(**{**SD_DDIM, "prediction_type": prediction_type, **overrides})
    scheduler.set_timesteps(20)
    return scheduler


def random_inputs(seed=0, shape=(3, 4, 8, 8)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), \
        torch.randn(shape, generator=generator)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_prev_sample_equals_diffusers_step_with_same_noise(prediction_type, eta):
    scheduler = ddim(prediction_type)
    model_output, sample, noise = random_inputs()
    for timestep in scheduler.timesteps[[0, 7, -1]]:
        expected = scheduler.step(model_output, timestep, sample, eta=eta, variance_noise=noise).prev_sample
        _, _, mean, std = ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=eta)
        assert torch.allclose(mean + std * noise, expected, atol=1e-5, rtol=1e-5)


def test_ddim_generator_draws_the_noise_diffusers_would():
    scheduler = ddim()
    model_output, sample, _ = random_inputs()
    timestep = scheduler.timesteps[3]
    ours, *_ = ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0,
                                      generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(model_output, timestep, sample, eta=1.0,
                            generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_ddim_clip_sample_and_batched_timesteps_match_diffusers():
    scheduler = ddim(clip_sample=True, clip_sample_range=0.5)
    model_output, sample, noise = random_inputs()
    timesteps = scheduler.timesteps[[0, 5, 12]]
    _, _, mean, std = ddim_step_with_logprob(scheduler, model_output, timesteps, sample, eta=1.0)
    for row, timestep in enumerate(timesteps):
        expected = scheduler.step(model_output[row:row + 1], timestep, sample[row:row + 1], eta=1.0,
                                  variance_noise=noise[row:row + 1]).prev_sample
        assert torch.allclose(mean[row:row + 1] + std[row:row + 1] * noise[row:row + 1], expected, atol=1e-5)


def hand_mean_of(scheduler, model_output, timestep, sample, eta=1.0):
    """DESIGN.md §7's DDIM mean and sigma_t in float64 from the scheduler's alphas (epsilon prediction, no clip)."""
    alphas = scheduler.alphas_cumprod.double()
    previous = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = alphas[int(timestep)]
    alpha_prev = alphas[previous] if previous >= 0 else torch.tensor(float(scheduler.final_alpha_cumprod)).double()
    eps, x = model_output.double(), sample.double()
    original = (x - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
    return alpha_prev.sqrt() * original + (1 - alpha_prev - sigma**2).sqrt() * eps, sigma


def hand_log_prob(scheduler, model_output, timestep, sample, prev_sample, eta):
    """DESIGN.md §7 in float64, element by element, from the scheduler's alphas."""
    mean, sigma = hand_mean_of(scheduler, model_output, timestep, sample, eta)
    densities = -((prev_sample.double() - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return densities.flatten(1).mean(dim=1)


@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_ddim_log_prob_equals_float64_hand_computation(eta):
    scheduler = ddim()
    model_output, sample, other = random_inputs(seed=1)
    for timestep in scheduler.timesteps[[0, 10, -1]]:
        prev_sample, log_prob, _, _ = ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=eta,
                                                             generator=torch.Generator().manual_seed(0))
        assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
        expected = hand_log_prob(scheduler, model_output, timestep, sample, prev_sample, eta)
        assert torch.allclose(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
        # an arbitrary given prev_sample is scored, not redrawn
        _, scored, _, _ = ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=eta, prev_sample=other)
        assert torch.allclose(scored.double(), hand_log_prob(scheduler, model_output, timestep, sample, other, eta),
                              rtol=1e-4, atol=1e-4)


def test_log_prob_is_mean_over_elements_and_gradient_flows_through_mean_only():
    """The gradient with respect to the model output is the hand one for a fixed x_{t-1}: d log p / d eps =
    (x_{t-1} - mu) / sigma^2 * d mu / d eps / n over the n elements, d mu / d eps = sqrt(1 - a_p - sigma^2)
    - sqrt(a_p) sqrt(1 - a_t) / sqrt(a_t). Were x_{t-1} = mu + sigma z not detached, x_{t-1} - mu would not depend
    on eps and the gradient would vanish."""
    scheduler = ddim()
    model_output, sample, _ = random_inputs()
    model_output.requires_grad_(True)
    timestep = scheduler.timesteps[2]
    prev_sample, log_prob, mean, std = ddim_step_with_logprob(scheduler, model_output, timestep, sample, eta=1.0)
    assert not prev_sample.requires_grad
    expected = hand_log_prob(scheduler, model_output.detach(), timestep, sample, prev_sample, 1.0)
    assert torch.allclose(log_prob.double(), expected, atol=1e-5)  # the mean over elements, not the sum
    log_prob.sum().backward()
    alphas = scheduler.alphas_cumprod.double()
    alpha_t, alpha_prev = alphas[int(timestep)], alphas[int(timestep) - 1000 // 20]
    sigma2 = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    slope = (1 - alpha_prev - sigma2).sqrt() - alpha_prev.sqrt() * (1 - alpha_t).sqrt() / alpha_t.sqrt()
    hand_mean, _ = hand_mean_of(scheduler, model_output.detach(), timestep, sample)
    hand_gradient = (prev_sample.double() - hand_mean) / sigma2 * slope / model_output[0].numel()
    assert torch.allclose(model_output.grad.double(), hand_gradient, rtol=1e-4, atol=1e-7)
    assert hand_gradient.abs().max() > 1e-4


def test_math_runs_in_float32_for_half_inputs():
    """Half inputs give exactly the float32 step of the same (half-rounded) values, the drawn x_{t-1} rounded to
    half afterwards; not a step computed in half precision."""
    scheduler = ddim()
    model_output, sample, _ = random_inputs()
    prev_sample, log_prob, mean, _ = ddim_step_with_logprob(scheduler, model_output.half(), scheduler.timesteps[2],
                                                            sample.half(), eta=1.0,
                                                            generator=torch.Generator().manual_seed(0))
    assert mean.dtype == torch.float32 and log_prob.dtype == torch.float32 and prev_sample.dtype == torch.float16
    full, full_log_prob, full_mean, _ = ddim_step_with_logprob(scheduler, model_output.half().float(),
                                                               scheduler.timesteps[2], sample.half().float(),
                                                               eta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mean, full_mean) and torch.equal(log_prob, full_log_prob)
    assert torch.equal(prev_sample, full.half())


def test_zero_variance_steps_have_undefined_log_prob():
    # DDIM built from a DDPM config (set_alpha_to_one=True, steps_offset=0): the last step lands on alpha=1.
    scheduler = DDIMScheduler.from_config(DDPMScheduler(clip_sample=True).config)
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[-1]) == 0
    model_output, sample, _ = random_inputs()
    _, log_prob, _, std = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[-1], sample, eta=1.0)
    assert float(std.max()) == 0 and torch.isnan(log_prob).all()
    prev_sample, log_prob, mean, std = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[-2],
                                                              sample, eta=1.0)
    alphas = scheduler.alphas_cumprod.double()  # the step before lands on t = 0, not on alpha = 1
    alpha_t, alpha_prev = alphas[int(scheduler.timesteps[-2])], alphas[0]
    sigma = math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
    assert float(std) == pytest.approx(sigma, rel=1e-5)
    density = torch.distributions.Normal(mean.double(), sigma).log_prob(prev_sample.double()).flatten(1).mean(dim=1)
    assert torch.allclose(log_prob.double(), density, rtol=1e-5)
    _, log_prob, _, _ = ddim_step_with_logprob(scheduler, model_output, scheduler.timesteps[2], sample, eta=0.0)
    assert torch.isnan(log_prob).all()


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("inference_steps", [None, 25])
def test_ddpm_step_equals_diffusers_with_same_generator(variance_type, inference_steps):
    scheduler = DDPMScheduler(variance_type=variance_type, clip_sample=True)
    if inference_steps:
        scheduler.set_timesteps(inference_steps)
    model_output, sample, _ = random_inputs(seed=3)
    timesteps = scheduler.timesteps[[0, len(scheduler.timesteps) // 2, -2, -1]]
    for timestep in timesteps:
        ours, log_prob, mean, std = ddpm_step_with_logprob(scheduler, model_output, timestep, sample,
                                                           generator=torch.Generator().manual_seed(11))
        theirs = scheduler.step(model_output, timestep, sample, generator=torch.Generator().manual_seed(11)).prev_sample
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        if int(timestep) == 0:
            assert torch.isnan(log_prob).all() and float(std.max()) == 0
        else:
            expected = hand_ddpm_log_prob(scheduler, model_output, timestep, sample, ours, variance_type)
            # near t = 0 sigma is ~0.01, so float32 rounding of the mean shows at ~2e-4 relative in the density
            assert torch.allclose(log_prob.double(), expected, rtol=1e-3)


def hand_ddpm_log_prob(scheduler, model_output, timestep, sample, prev_sample, variance_type):
    """The DDPM posterior q(x_{t-1} | x_t, x0_hat) in float64 from the scheduler's alphas, scored with
    torch.distributions (independent of the function under test)."""
    alphas = scheduler.alphas_cumprod.double()
    schedule = scheduler.timesteps.tolist()
    position = schedule.index(int(timestep))
    previous = schedule[position + 1] if position + 1 < len(schedule) else -1
    alpha_t = alphas[int(timestep)]
    alpha_prev = alphas[previous] if previous >= 0 else torch.tensor(1.0, dtype=torch.float64)
    beta = 1 - alpha_t / alpha_prev
    original = ((sample.double() - (1 - alpha_t).sqrt() * model_output.double()) / alpha_t.sqrt()).clamp(-1, 1)
    mean = (alpha_prev.sqrt() * beta / (1 - alpha_t)) * original \
        + ((1 - beta).sqrt() * (1 - alpha_prev) / (1 - alpha_t)) * sample.double()
    variance = beta if variance_type == "fixed_large" else (1 - alpha_prev) / (1 - alpha_t) * beta
    density = torch.distributions.Normal(mean, variance.sqrt()).log_prob(prev_sample.double())
    return density.flatten(1).mean(dim=1)


def test_unsupported_scheduler_settings_are_refused():
    scheduler = DDPMScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="variance_type"):
        ddpm_step_with_logprob(scheduler, torch.zeros(1, 3, 4, 4), 10, torch.zeros(1, 3, 4, 4))
    unset = DDIMScheduler(**SD_DDIM)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(unset, torch.zeros(1, 4, 4, 4), 10, torch.zeros(1, 4, 4, 4))
