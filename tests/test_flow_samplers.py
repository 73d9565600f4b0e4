"""The flow SDEs `sample.sde` selects besides Flow-GRPO's (tests/test_flow_grpo.py): DanceGRPO's and the
coefficients-preserving sampler (CPS). Oracles are written from the formulas (docs/models.md) in float64: each
step's mean and std by hand, its log-prob as the Gaussian density of the returned sample, the Euler step at eta = 0,
and Monte Carlo from the exact marginals of rectified flow with a single data point."""

import math

import pytest
import torch

from helpers import flow_scheduler, velocity_inputs
from ddpo.core.math.logprob import FLOW_SDE_STEPS, cps_step_with_logprob, dance_grpo_step_with_logprob
from ddpo.core.math.samplers import FlowSDESampler

NEW_STEPS = {"dance-grpo": dance_grpo_step_with_logprob, "cps": cps_step_with_logprob}


def hand_mean_std(sde, sigma, sigma_next, x, v, eta):
    """The step's mean (float64 tensor) and std (float) from the formulas, not from our code."""
    x, v = x.double(), v.double()
    if sde == "dance-grpo":  # DanceGRPO fastvideo/train_grpo_flux.py:131-170
        x0_hat = x - sigma * v
        score = -(x - (1 - sigma) * x0_hat) / sigma**2
        mean = x + (sigma_next - sigma) * v - 0.5 * eta**2 * score * (sigma_next - sigma)
        return mean, eta * math.sqrt(sigma - sigma_next)
    std = sigma_next * math.sin(eta * math.pi / 2)  # flow_grpo sd3_sde_with_logprob.py:70-86
    mean = (1 - sigma_next) * (x - sigma * v) + math.sqrt(sigma_next**2 - std**2) * (x + (1 - sigma) * v)
    return mean, std


@pytest.mark.parametrize("sde", NEW_STEPS)
def test_zero_noise_is_the_schedulers_euler_step(sde):
    scheduler = flow_scheduler()
    velocity, sample = velocity_inputs()
    for index, timestep in enumerate(scheduler.timesteps):
        scheduler._step_index = index
        expected = scheduler.step(velocity, timestep, sample).prev_sample
        ours, log_prob, _, std = NEW_STEPS[sde](scheduler, velocity, timestep, sample, noise_level=0.0)
        assert torch.allclose(ours, expected, atol=1e-5) and float(std.max()) == 0 and torch.isnan(log_prob).all()


@pytest.mark.parametrize("sde", NEW_STEPS)
@pytest.mark.parametrize("index", [0, 4, 8, 9])
def test_mean_std_and_log_prob_equal_a_float64_hand_computation(sde, index):
    scheduler = flow_scheduler()
    velocity, sample = velocity_inputs(seed=1)
    eta = 0.7
    prev_sample, log_prob, mean, std = NEW_STEPS[sde](scheduler, velocity, scheduler.timesteps[index], sample,
                                                      noise_level=eta, generator=torch.Generator().manual_seed(0))
    sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    hand_mean, hand_std = hand_mean_std(sde, sigma, sigma_next, sample, velocity, eta)
    assert torch.allclose(mean.double(), hand_mean, rtol=1e-5, atol=1e-5)
    assert float(std.flatten()[0]) == pytest.approx(hand_std, rel=1e-6, abs=1e-7)
    if hand_std == 0:  # CPS's last step (sigma' = 0): deterministic, no log-prob
        assert sde == "cps" and torch.isnan(log_prob).all() and torch.allclose(prev_sample.double(), hand_mean)
        return
    y = prev_sample.double()
    density = -((y - hand_mean) ** 2) / (2 * hand_std**2) - math.log(hand_std) - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(log_prob.double(), density.flatten(1).mean(dim=1), rtol=1e-4, atol=1e-4)
    scored = NEW_STEPS[sde](scheduler, velocity, scheduler.timesteps[index], sample, noise_level=eta,
                            prev_sample=prev_sample)[1]
    assert torch.equal(scored, log_prob)  # re-scoring the recorded sample gives the same log-prob


# For a single data point x_0 the marginal at sigma is x = (1 - sigma) x_0 + sigma e, e ~ N(0, 1), and the exact
# velocity is v = e - x_0 = (x - x_0) / sigma; then x0_hat = x_0 and the predicted noise x + (1 - sigma) v = e.

def exact_marginal_steps(step, sigma, sigma_next, x0, draws, eta, generator):
    """Per step k: draws of e, x_sigma from the exact marginal and one step of each with the exact velocity:
    returns (e, x_sigma') each (K, draws, *x0.shape) float64."""
    count, shaped = len(sigma), [1] * x0.ndim
    sigmas = sigma.repeat_interleave(draws).reshape(-1, *shaped)
    noise = torch.randn((count * draws, *x0.shape), generator=generator, dtype=torch.float64)
    sample = (1 - sigmas) * x0 + sigmas * noise
    moved, *_ = step(flow_scheduler(), (sample - x0) / sigmas, sigma.repeat_interleave(draws) * 1000, sample,
                     noise_level=eta, generator=generator, prev_timestep=sigma_next.repeat_interleave(draws) * 1000)
    return noise.reshape(count, draws, *x0.shape), moved.double().reshape(count, draws, *x0.shape)


def monte_carlo(sde, eta):
    scheduler = flow_scheduler()
    sigma, sigma_next = scheduler.sigmas[:-1].double(), scheduler.sigmas[1:].double()
    assert sigma[0] == 1 and sigma_next[-1] == 0
    x0 = 1.5 * torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = 4000
    noise, moved = exact_marginal_steps(NEW_STEPS[sde], sigma.float(), sigma_next.float(), x0, draws, eta,
                                        torch.Generator().manual_seed(0))
    return sigma.tolist(), sigma_next.tolist(), x0, draws, noise, moved


def assert_moments(residual, variance, draws, elements, step):
    """Per-element mean of `residual` 0 and pooled variance `variance`, within 5 standard errors."""
    error = residual.mean(dim=0).abs().max().item()
    assert error <= 5 * math.sqrt(variance / draws) + 1e-6, (step, error)
    pooled = residual.var(dim=0, unbiased=True).mean().item()
    assert pooled == pytest.approx(variance, rel=5 * math.sqrt(2 / (draws * elements)), abs=1e-10), (step, pooled)


@pytest.mark.parametrize("eta", [0.7, 0.3])
def test_cps_step_from_the_exact_marginal_preserves_the_coefficients(eta):
    """CPS: x' = (1 - sigma') x_0 + sigma' (cos(eta pi/2) e + sin(eta pi/2) z), so one step from the exact
    marginal lands EXACTLY on the marginal N((1 - sigma') x_0, sigma'^2) at sigma', on every step of a 10-step
    shift-3 schedule (sigma = 1 first; sigma' = 0 last, where x' = x_0). Checked: mean, variance sigma'^2 (unit
    total noise variance), and the cos-mixing, Cov(x' - (1 - sigma') x_0, e) = sigma' cos(eta pi/2)."""
    sigma, sigma_next, x0, draws, noise, moved = monte_carlo("cps", eta)
    for step, s_next in enumerate(sigma_next):
        residual = moved[step] - (1 - s_next) * x0
        if s_next == 0:
            assert residual.abs().max().item() < 1e-5, step
            continue
        assert_moments(residual, s_next**2, draws, x0.numel(), step)
        covariance = (residual * noise[step]).mean().item()  # both have mean 0
        assert covariance == pytest.approx(s_next * math.cos(eta * math.pi / 2),
                                           abs=5 * s_next / math.sqrt(draws * x0.numel())), step


def dance_grpo_variance(s, s_next, eta):
    """Variance of DanceGRPO's step from the exact marginal: with d = sigma - sigma',
    x' = (1 - sigma') x_0 + (sigma' - eta^2 d / (2 sigma)) e + eta sqrt(d) z."""
    d = s - s_next
    return (s_next - eta**2 * d / (2 * s)) ** 2 + eta**2 * d


@pytest.mark.parametrize("eta", [0.7, 0.3])
def test_dance_grpo_step_from_the_exact_marginal_has_its_mean_and_a_predicted_excess_variance(eta):
    """DanceGRPO's drift v - (eta^2/2) score is the reverse SDE of the flow's marginals with diffusion eta (exact
    in continuous time), but one Euler-Maruyama step is not: from the exact marginal it keeps the mean
    (1 - sigma') x_0 exactly, and its variance is sigma'^2 + eta^2 d^2 / sigma + eta^4 d^2 / (4 sigma^2)
    (d = sigma - sigma'), NOT the marginal's sigma'^2. Checked on every step of a 10-step shift-3 schedule
    (sigma = 1 first, sigma' = 0 last): the measured mean, the measured variance against that prediction, and
    that the prediction's excess over sigma'^2 is what the formula says (e.g. eta^2 sigma + eta^4 / 4 on the last
    step)."""
    sigma, sigma_next, x0, draws, noise, moved = monte_carlo("dance-grpo", eta)
    for step, (s, s_next) in enumerate(zip(sigma, sigma_next, strict=True)):
        variance = dance_grpo_variance(s, s_next, eta)
        d = s - s_next
        assert variance - s_next**2 == pytest.approx(eta**2 * d**2 / s + eta**4 * d**2 / (4 * s**2))
        assert variance - s_next**2 > 0
        assert_moments(moved[step] - (1 - s_next) * x0, variance, draws, x0.numel(), step)
    last = dance_grpo_variance(sigma[-1], 0.0, eta)
    assert last == pytest.approx(eta**2 * sigma[-1] + eta**4 / 4)


def test_the_sampler_steps_with_the_chosen_sde_and_scales_the_kl_by_its_duration():
    scheduler = flow_scheduler()
    velocity, sample = velocity_inputs(seed=2)
    timesteps, prev_timesteps = FlowSDESampler(scheduler).set_timesteps(10, torch.device("cpu"))
    t, t_prev = timesteps[3].repeat(3), prev_timesteps[3].repeat(3)
    for sde, function in FLOW_SDE_STEPS.items():
        sampler = FlowSDESampler(scheduler, sde)
        ours = sampler.step(velocity, t, t_prev, sample, 0.7, generator=torch.Generator().manual_seed(0))
        direct = function(scheduler, velocity, t, sample, noise_level=0.7, prev_timestep=t_prev,
                          generator=torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(ours, direct, strict=True)), sde
        duration = sampler.step_duration(t, t_prev).flatten()
        expected = 1.0 if sde == "cps" else float((t[0] - t_prev[0]) / 1000)
        assert torch.allclose(duration, torch.full_like(duration, expected)), sde
    with pytest.raises(ValueError, match="unknown flow SDE"):
        FlowSDESampler(scheduler, "ode")


def test_a_model_takes_sample_sde_on_its_flow_sampler_and_refuses_it_elsewhere():
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from ddpo.core.math.samplers import DDIMSampler
    from ddpo.core.plugin_api.model import Model

    flow = SimpleNamespace(sampler=FlowSDESampler(flow_scheduler()))
    Model.use_sde(flow, "cps")
    assert flow.sampler.sde == "cps"
    ddim = SimpleNamespace(sampler=DDIMSampler(DDIMScheduler()))
    Model.use_sde(ddim, "flow-grpo")  # the default is a no-op on any sampler
    with pytest.raises(ValueError, match="needs a flow-matching sampler"):
        Model.use_sde(ddim, "dance-grpo")
