"""Flow matching and GRPO: the flow-SDE step against diffusers' Euler step, a float64 hand computation and the
exact marginals of rectified flow, the SD3 model plugin on a tiny pipeline, group-relative advantages, groups that
span batches and processes, the KL term's value and gradient against Flow-GRPO's kl_loss, and `grpo` learning on
the digits task."""

import json
import math
import random

import numpy as np
import pytest
import torch

from helpers import assert_learned, flow_scheduler, learning_cases, learning_run, velocity_inputs
from ddpo.core.configuration.config import SampleConfig
from ddpo.core.engine.rollout import RolloutEngine, sample_batch
from ddpo.core.math.advantages import group_advantages
from ddpo.core.math.logprob import flow_sde_step_with_logprob
from ddpo.plugins.models.ddpm import PixelDDPM
from ddpo.plugins.models.sd3 import StableDiffusion3
from ddpo.plugins.prompts import SimpleAnimals


def test_flow_sde_with_zero_noise_is_the_schedulers_euler_step():
    scheduler = flow_scheduler()
    velocity, sample = velocity_inputs()
    for index, timestep in enumerate(scheduler.timesteps):
        scheduler._step_index = index  # diffusers' step reads its own position; ours reads the timestep
        expected = scheduler.step(velocity, timestep, sample).prev_sample
        ours, log_prob, _, std = flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, noise_level=0.0)
        assert torch.allclose(ours, expected, atol=1e-6) and float(std.max()) == 0 and torch.isnan(log_prob).all()


def hand_flow_log_prob(sigma, sigma_next, velocity, sample, prev_sample, noise_level):
    """DESIGN.md §7's flow SDE in float64, element by element."""
    x, v, y = sample.double(), velocity.double(), prev_sample.double()
    dt = sigma_next - sigma
    std = noise_level * math.sqrt(sigma / (1 - (sigma_next if sigma >= 1 else sigma)))
    mean = x * (1 + std**2 * dt / (2 * sigma)) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    total = std * math.sqrt(-dt)
    density = -((y - mean) ** 2) / (2 * total**2) - math.log(total) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(dim=1)


@pytest.mark.parametrize("index", [0, 4, 9])
def test_flow_sde_log_prob_equals_a_float64_hand_computation(index):
    scheduler = flow_scheduler()
    velocity, sample = velocity_inputs(seed=1)
    timestep = scheduler.timesteps[index]
    prev_sample, log_prob, _, _ = flow_sde_step_with_logprob(scheduler, velocity, timestep, sample, noise_level=0.7,
                                                             generator=torch.Generator().manual_seed(0))
    sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    expected = hand_flow_log_prob(sigma, sigma_next, velocity, sample, prev_sample, 0.7)
    assert torch.allclose(log_prob.double(), expected, rtol=1e-4, atol=1e-4)
    assert index != 0 or sigma == 1.0  # the first step exercises the sigma = 1 case


# The flow SDE against the exact marginals of rectified flow. For a single data point x_0 the marginal at sigma is
# x = (1 - sigma) x_0 + sigma z, z ~ N(0, 1), and the exact velocity of its ODE is E[z - x_0 | x] = (x - x_0) / sigma.

def exact_marginal_steps(scheduler, x0, sigma, sigma_next, draws, noise_level, generator):
    """x_sigma drawn from the exact marginal `draws` times per step, for steps (sigma[k] -> sigma_next[k]), and one
    SDE step of each with its exact velocity, batched: returns x_sigma' (K, draws, *x0.shape) float64."""
    count = len(sigma)
    shape = (count * draws, *x0.shape)
    sigmas = sigma.repeat_interleave(draws).reshape(-1, *[1] * x0.ndim)
    sample = (1 - sigmas) * x0 + sigmas * torch.randn(shape, generator=generator, dtype=torch.float64)
    velocity = (sample - x0) / sigmas
    moved, *_ = flow_sde_step_with_logprob(scheduler, velocity, sigma.repeat_interleave(draws) * 1000, sample,
                                           noise_level=noise_level, generator=generator,
                                           prev_timestep=sigma_next.repeat_interleave(draws) * 1000)
    return moved.double().reshape(count, draws, *x0.shape)


@pytest.mark.parametrize("noise_level", [0.7, 0.3])
def test_flow_sde_step_from_the_exact_marginal_has_its_mean_and_the_steps_variance(noise_level):
    """Monte Carlo over 4,000 draws of 64 elements per step, every step of a 10-step shift-3 schedule (sigma = 1
    first, sigma' = 0 last), float64. Written out for the exact marginal, x + (1 - sigma) v = z, so the SDE step
    (DESIGN.md §7, with s = eta sqrt(sigma / (1 - sigma)), sigma' for sigma in it at sigma = 1, dt = sigma' - sigma)
    gives
        x' = (1 - sigma') x_0 + (sigma' + s^2 dt / (2 sigma)) z + s sqrt(-dt) xi
    The mean is the marginal's, (1 - sigma') x_0, exactly. The variance is the marginal's sigma'^2 plus
    s^2 dt^2 / sigma + s^4 dt^2 / (4 sigma^2), the one-step error of discretising an SDE that keeps the marginals
    in continuous time (O(dt^2); the test below shows it vanish under refinement): large on this coarse grid
    (0.058 instead of 8e-5 at sigma' = 0.009), so a single step does NOT land on N((1 - sigma') x_0, sigma'^2)."""
    scheduler = flow_scheduler()
    sigma, sigma_next = scheduler.sigmas[:-1].double(), scheduler.sigmas[1:].double()
    assert sigma[0] == 1 and sigma_next[-1] == 0
    x0 = 1.5 * torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = 4000
    moved = exact_marginal_steps(scheduler, x0, sigma.float(), sigma_next.float(), draws, noise_level,
                                 torch.Generator().manual_seed(0))
    for step, (s, s_next) in enumerate(zip(sigma.tolist(), sigma_next.tolist(), strict=True)):
        dt = s_next - s
        level = noise_level**2 * s / (1 - (s_next if s == 1 else s))  # s^2
        variance = s_next**2 + level * dt**2 / s + level**2 * dt**2 / (4 * s**2)
        residual = moved[step] - (1 - s_next) * x0
        error = residual.mean(dim=0).abs().max().item()
        assert error <= 5 * math.sqrt(variance / draws), (step, error)
        pooled = residual.var(dim=0, unbiased=True).mean().item()
        assert pooled == pytest.approx(variance, rel=5 * math.sqrt(2 / (draws * x0.numel()))), (step, pooled, variance)


def propagate_exact_marginal(scheduler, x0, sigma, sigma_next, substeps, noise_level):
    """N((1 - sigma) x_0, sigma^2) pushed from each sigma to its sigma' through `substeps` equal SDE steps with the
    exact velocity, without sampling: with v = (x - x_0) / sigma a step's mean is affine in x, so a Gaussian stays
    Gaussian, its new mean the step's mean at the old one and its variance slope^2 V + std^2, the slope read off the
    step's means at m and m + 1. Returns (means (K, *x0.shape), variances (K,)) float64 at the sigma'."""
    count = len(sigma)
    grid = sigma[:, None] + (sigma_next - sigma)[:, None] * torch.arange(substeps + 1, dtype=torch.float64) / substeps
    shaped = [1] * x0.ndim
    mean = (1 - sigma).reshape(-1, *shaped) * x0
    variance = sigma**2
    for k in range(substeps):
        here, there = grid[:, k].repeat(2), grid[:, k + 1].repeat(2)
        sample = torch.cat([mean, mean + 1])
        _, _, moved, std = flow_sde_step_with_logprob(scheduler, (sample - x0) / here.reshape(-1, *shaped),
                                                      here * 1000, sample, noise_level=noise_level,
                                                      prev_timestep=there * 1000)
        slope = (moved[count:] - moved[:count]).double().flatten(1).mean(dim=1)
        mean, variance = moved[:count].double(), slope**2 * variance + std[:count].double().flatten() ** 2
    return mean, variance


@pytest.mark.parametrize("noise_level", [0.7, 0.3])
def test_flow_sde_keeps_the_exact_marginals_as_its_steps_shrink(noise_level):
    """The SDE has the ODE's marginals (Flow-GRPO's construction): from N((1 - sigma) x_0, sigma^2) with the exact
    velocity, n steps from sigma to sigma' end at mean (1 - sigma') x_0 for every n, and at a variance whose excess
    over sigma'^2 vanishes as n grows: like 1/n (first order) on every step of the schedule with sigma < 1, the last
    (sigma' = 0) included; more slowly from sigma = 1, where the noise eta^2 sigma / (1 - sigma) is unbounded and the
    scheme puts sigma' in its place. A drift with another score weight or sign converges to another variance."""
    scheduler = flow_scheduler()
    sigma, sigma_next = scheduler.sigmas[:-1].double(), scheduler.sigmas[1:].double()
    x0 = torch.tensor([1.5, -0.7, 0.2, -2.0], dtype=torch.float64).reshape(1, 2, 2)
    excess = {}
    for substeps in (1, 4, 16, 64, 256):
        mean, variance = propagate_exact_marginal(scheduler, x0, sigma, sigma_next, substeps, noise_level)
        assert torch.allclose(mean, (1 - sigma_next).reshape(-1, 1, 1, 1) * x0, atol=1e-5), substeps
        excess[substeps] = variance - sigma_next**2
    assert (excess[1] > 0).all()
    interior = sigma < 1
    assert (excess[256][interior] < excess[1][interior] / 50).all(), (excess[1], excess[256])
    assert (excess[64][interior] < excess[4][interior] / 8).all(), (excess[4], excess[64])  # first order: /16
    assert (excess[256][interior] <= 2e-4).all(), excess[256]  # (float32 steps: ~1e-5 is rounding)
    from_one = [float(excess[n][0]) for n in (4, 16, 64, 256)]
    assert from_one == sorted(from_one, reverse=True) and from_one[-1] < 0.6 * from_one[0], from_one


@pytest.fixture(scope="module")
def sd3_model(tiny_sd3):
    model = StableDiffusion3({"pretrained": str(tiny_sd3), "lora_rank": 4})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    return model


def test_sd3_trajectories_carry_both_embeddings_and_recompute_to_ratio_one(sd3_model):
    trajectory, images = sample_batch(sd3_model, ["cat", "dog"], [{}, {}], num_steps=4, eta=0.7, guidance_scale=4.5,
                                      generator=torch.Generator().manual_seed(0))
    assert set(trajectory.prompt_embeds) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert trajectory.prompt_embeds["pooled_prompt_embeds"].shape == (2, 64) and images.shape == (2, 3, 32, 32)
    assert trajectory.timesteps.dtype == torch.float32 and trajectory.policy_steps.all()
    sd3_model.set_timesteps(40)  # an evaluation with more steps in between must not matter
    with torch.no_grad():
        for transitions in trajectory.training_transitions(2, torch.Generator().manual_seed(0)):
            log_prob, *_ = sd3_model.step_log_prob(transitions, eta=0.7, guidance_scale=4.5)
            assert torch.equal(torch.exp(log_prob - transitions.log_probs), torch.ones(2))
    picked = trajectory[torch.tensor([1])]
    assert torch.equal(picked.prompt_embeds["prompt_embeds"][0], trajectory.prompt_embeds["prompt_embeds"][1])


def test_group_advantages_match_a_hand_computation_and_count_flat_groups():
    rewards = np.array([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    advantages, flat = group_advantages(rewards, groups)
    assert advantages == pytest.approx([-1 / 1.0001, 1 / 1.0001, 0, 0, -2 / 2.0001, 2 / 2.0001])
    assert flat == 1
    global_advantages, _ = group_advantages(rewards, groups, global_std=True)
    assert global_advantages[:2] == pytest.approx(np.array([-1.0, 1.0]) / (rewards.std() + 1e-4))


class Brightness:
    name = "brightness"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("same_noise", [True, False])
def test_groups_larger_than_a_batch_span_batches_and_processes(tiny_ddpm, same_noise):
    model = PixelDDPM({"pretrained": str(tiny_ddpm)})
    model.load(torch.device("cpu"), torch.float32)
    config = SampleConfig(batch_size=2, batches_per_epoch=2, num_steps=2, eta=1.0, guidance_scale=1.0)
    parts = []
    for process in (0, 1):  # two processes, 4 samples each, groups of 8: one group over both
        engine = RolloutEngine(model, Brightness(), SimpleAnimals(), config, group_size=8, process_index=process,
                               num_processes=2, share_group_noise=same_noise)
        trajectory, _ = engine.collect(torch.Generator().manual_seed(process), random.Random(process),
                                       shared_rng=random.Random(5), shared_generator=torch.Generator().manual_seed(5))
        engine.close()
        parts.append(trajectory)
    starts = torch.cat([part.latents[:, 0] for part in parts])
    assert all(part.group_ids.tolist() == [0] * 4 for part in parts)
    assert all((starts[index] == starts[0]).all() == same_noise for index in range(1, 8))


def test_grpo_runs_on_the_tiny_sd3_pipeline_and_exports_lora_for_diffusers(tiny_sd3, forked_cli, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    result = forked_cli.run("run", "--algo", "grpo", "--model", "sd3", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sd3}", "--set", "model.lora_rank=4",
                            "--set", "algorithm.group_size=4", "--set", "algorithm.kl_beta=0.04",
                            "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1",
                            "--set", "sample.num_steps=3",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--set", "eval.num_steps=5",
                            "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "flow")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "flow" / "metrics.jsonl").read_text().splitlines()]
    # One group of 4, one optimizer step per epoch after all 3 steps' passes: every pass runs at the sampling
    # policy (ratio 1), where the surrogate is mean(-A) = 0 for centred advantages. The first epoch's policy is the
    # pretrained model (LoRA's B is 0 until the first step): KL exactly 0; the second's has moved away.
    for record in records:
        assert record["policy/ratio_dev_first"] <= 1e-6 and record["train/optimizer_steps"] == 1
        assert record["grpo/zero_std_groups"] == 0 and record["grpo/trained_samples"] == 4
        assert record["loss/policy"] == pytest.approx(0, abs=1e-6)
        assert record["loss/total"] == pytest.approx(record["loss/policy"] + 0.04 * record["loss/kl"], abs=1e-7)
        assert record["policy/kl_to_reference"] == record["loss/kl"]
        assert record["eval/compressibility/mean"] < 0  # minus a JPEG size in kB
    assert records[0]["loss/kl"] == 0 and records[1]["loss/kl"] > 0
    checkpoint = tmp_path / "flow" / "checkpoints" / "epoch_0002"
    ours = StableDiffusion3({"pretrained": str(tiny_sd3), "lora_rank": 4})
    ours.load(torch.device("cpu"), torch.float32)
    ours.configure_training()
    ours.load_weights(checkpoint)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=generator), timestep=torch.tensor([900.0, 40.0]),
                  encoder_hidden_states=torch.randn(2, 8, 32, generator=generator),
                  pooled_projections=torch.randn(2, 64, generator=generator))
    with torch.no_grad():
        base = pipeline.transformer(**inputs).sample
        pipeline.load_lora_weights(checkpoint / "lora")
        loaded = pipeline.transformer(**inputs).sample
        trained = ours.denoiser(**inputs).sample
    assert not torch.allclose(base, trained, atol=1e-6)  # training moved the adapters
    assert torch.allclose(loaded, trained, atol=1e-5)  # diffusers' loader reads them as they were trained


@pytest.mark.parametrize("sde", ["dance-grpo", "cps"])
def test_grpo_trains_the_tiny_sd3_with_each_flow_sde(sde, tiny_sd3, forked_cli, tmp_path):
    """A GRPO run samples and trains with the chosen `sample.sde`: the first pass recomputes every sampled step's
    log-prob under the same step (ratio 1 to float rounding; a different step's density would be far off), the
    KL to the pretrained model is 0 in the first epoch (LoRA's B is 0 until its one optimizer step) and not in
    the second: the step moved the adapters."""
    result = forked_cli.run("run", "--algo", "grpo", "--model", "sd3", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sd3}", "--set", "model.lora_rank=4",
                            "--set", f"sample.sde={sde}", "--set", "algorithm.group_size=4",
                            "--set", "algorithm.kl_beta=0.04", "--set", "sample.batch_size=4",
                            "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=3",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                            "--epochs", "2", "--logdir", str(tmp_path), "--run-name", sde)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / sde / "metrics.jsonl").read_text().splitlines()]
    assert all(record["policy/ratio_dev_first"] <= 1e-5 for record in records), records
    assert [record["train/optimizer_steps"] for record in records] == [1, 1]
    assert records[0]["loss/kl"] == 0 and records[1]["loss/kl"] > 0


GRPO_THRESHOLD, GRPO_EPOCHS = 0.19, 8


@pytest.mark.slow
@pytest.mark.parametrize("target, seed, shuffled", learning_cases([(3, 1), (8, 0), (8, 1)], control=(8, 1)))
def test_grpo_learns_digits_targets_from_their_rewards_not_from_shuffled_ones(forked_cli, tmp_path, target, seed,
                                                                             shuffled):
    """grpo's digits recipe (`model_run_defaults`: groups of 8 from one noise, KL 0.1 to the base model), 8 epochs.
    `reward_rise` on targets 3 / 8 x seeds 0, 1: 0.26 0.41 / 0.38 0.52 (benchmarks/bench_learning_tests.py; the
    seeds are the run-to-run spread), std 0.092. The pairs asserted rose 0.41, 0.38 and 0.52: at least 0.193 over
    the 0.19 threshold, more than 2 x 0.092. Target 7 is weak (0.08 and 0.28 with seeds 0 and 1; with them the std
    is 0.138) and is not asserted. Controls with shuffled rewards: (3, 0) 0.03, (8, 0) -0.12, (8, 1) -0.03 (the
    one asserted: 0.22 under the threshold, more than 2 x 0.092, so a float difference on another CPU cannot flip
    it), and (3, 1) 0.17: its first epoch drew few 3s (0.04) and the later epochs regress to the base rate, which
    the last-two-minus-first measure counts as a rise; only 0.02 under the threshold, it is not asserted. The
    lowest legibility of a run was 0.94-0.98. 33-40 CPU seconds a run (AMD EPYC, one thread)."""
    records = learning_run(forked_cli, tmp_path, "grpo", target, seed, GRPO_EPOCHS, shuffled=shuffled)
    assert_learned(records, shuffled, GRPO_THRESHOLD, min_legibility=0.9)


# -- Flow-GRPO's recipe, item by item, against transcriptions of its formulas ------------------------------------

def trained_sd3(tiny_sd3, seed=0, **options):
    """The tiny SD3 with LoRA whose adapters are moved off their initial values (B starts at 0), so that the policy
    differs from the pretrained reference and every LoRA matrix has a gradient."""
    model = StableDiffusion3({"pretrained": str(tiny_sd3), "lora_rank": 4, **options})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def grpo_run(model, tmp_path, *sets):
    from accelerate import Accelerator

    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.engine.run import Run
    from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization

    config = resolve_config(None, ["sample.batch_size=4", "sample.batches_per_epoch=1", "algorithm.group_size=2",
                                   *sets], {"model": {"name": model.name}, "algorithm": {"name": "grpo"}})
    algorithm = GroupRelativePolicyOptimization(config.algorithm.options())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.train.learning_rate)
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    return Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=algorithm,
               prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)


def flow_grpo_kl(sigma, sigma_next, sigma_max, sample, velocity, reference_velocity, noise_level):
    """Flow-GRPO's kl_loss of one sample at one step (scripts/train_sd3.py:895 with sd3_sde_with_logprob.py:42-50),
    in float64: the squared difference of the two SDE means over 2 std_dev_t², std_dev_t the noise level's std
    (no sqrt(|dt|)). A 0-d tensor, with gradient if `velocity` has one."""
    x, v, v_ref = sample.double(), velocity.double(), reference_velocity.double()
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level

    def mean(u):
        return x * (1 + std_dev_t**2 / (2 * sigma) * dt) + u * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt

    return ((mean(v) - mean(v_ref)) ** 2).mean() / (2 * std_dev_t**2)


def test_grpo_kl_on_the_flow_sde_is_flow_grpos_kl_loss(tiny_sd3, tmp_path):
    """The logged loss/kl of an update is the mean of Flow-GRPO's kl_loss over the trained (sample, step) pairs:
    the first int(4 x 0.99) = 3 steps of each sample, in order. The learning rate is too small to move a float32
    weight, so every micro-step sees the same policy."""
    model = trained_sd3(tiny_sd3)
    run = grpo_run(model, tmp_path, "sample.num_steps=4", "train.batch_size=2", "train.grad_accum=2",
                   "train.learning_rate=1e-30", "train.timestep_fraction=0.99", "train.timestep_selection=first",
                   "algorithm.kl_beta=0.04")
    trajectory, _ = sample_batch(model, ["a cat", "a cat", "a dog", "a dog"], [{}] * 4, num_steps=4, eta=0.7,
                                 guidance_scale=4.5, generator=torch.Generator().manual_seed(0))
    trajectory.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    sigmas = model.scheduler.sigmas.double()
    expected = []
    with torch.no_grad():
        for step in range(3):
            transitions = trajectory.transitions(torch.full((4,), step))
            velocity = model.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds, 4.5)
            with model.reference():
                reference = model.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds,
                                                4.5)
            for sample in range(4):
                expected.append(float(flow_grpo_kl(float(sigmas[step]), float(sigmas[step + 1]), float(sigmas[1]),
                                                   transitions.sample[sample], velocity[sample], reference[sample],
                                                   0.7)))

    metrics = run.algorithm.update(run, trajectory)

    assert min(expected) > 0
    assert metrics["loss/kl"] == pytest.approx(np.mean(expected), rel=1e-4)


def flat(gradients):
    return torch.cat([gradient.flatten() for gradient in gradients])


def test_grpo_kl_term_applies_the_gradient_of_flow_grpos_kl(tiny_sd3, tmp_path):
    """With every advantage 0 the clipped surrogate has no gradient, so the update applies beta times the gradient
    of the mean kl_loss over the trained (sample, step) pairs: here autograd on Flow-GRPO's kl_loss written from
    the policy's velocity (with gradient) and the reference's. One optimizer step takes the whole epoch (4 samples
    x 3 steps), unclipped; the recording optimizer leaves the weights, so every micro-step sees the same policy.
    A detached KL term, or one of the wrong sign or units, applies another gradient."""
    from test_rwr import GradientRecorder

    model = trained_sd3(tiny_sd3)
    run = grpo_run(model, tmp_path, "sample.num_steps=3", "train.batch_size=2", "train.grad_accum=2",
                   "train.max_grad_norm=1e9", "algorithm.kl_beta=0.04")
    parameters = model.trainable_parameters()
    recorder = run.modules["policy"].optimizer = GradientRecorder(parameters)
    trajectory, _ = sample_batch(model, ["a cat", "a cat", "a dog", "a dog"], [{}] * 4, num_steps=3, eta=0.7,
                                 guidance_scale=4.5, generator=torch.Generator().manual_seed(0))
    trajectory.advantages = torch.zeros(4)
    assert trajectory.policy_steps.all()  # every step of the flow SDE is trained, the last (to sigma 0) too
    sigmas = model.scheduler.sigmas.double()
    kls = []
    for step in range(3):
        transitions = trajectory.transitions(torch.full((4,), step))
        velocity = model.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds, 4.5)
        with torch.no_grad(), model.reference():
            reference = model.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds, 4.5)
        kls.extend(flow_grpo_kl(float(sigmas[step]), float(sigmas[step + 1]), float(sigmas[1]),
                                transitions.sample[sample], velocity[sample], reference[sample], 0.7)
                   for sample in range(4))
    hand = flat(torch.autograd.grad(0.04 * torch.stack(kls).mean(), parameters))

    metrics = run.algorithm.update(run, trajectory)

    (applied,) = recorder.steps
    assert metrics["train/optimizer_steps"] == 1 and metrics["loss/policy"] == 0
    assert metrics["loss/kl"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-4)
    assert float(hand.norm()) > 1e-3
    torch.testing.assert_close(applied.double(), hand.double(), rtol=1e-3, atol=1e-4 * float(hand.abs().max()))


@pytest.mark.parametrize(("name", "detach"), [("sd14", False), ("sd3", True), ("sd3", False)])
def test_guidance_passes_gradient_through_the_unconditional_branch_only_if_the_model_says(name, detach, tiny_sd,
                                                                                         tiny_sd3):
    """d(guided)/dθ = w d(cond)/dθ with the unconditional branch detached (Flow-GRPO, sd3's default), and
    w d(cond)/dθ − (w − 1) d(uncond)/dθ through both (ddpo-pytorch, SD 1.x's default), each branch's gradient
    taken from its own unguided forward pass."""
    from ddpo.plugins.models.sd import StableDiffusion

    if name == "sd3":
        model = trained_sd3(tiny_sd3, detach_unconditional=detach)
    else:
        model = StableDiffusion({"pretrained": str(tiny_sd), "lora_rank": 4})
        model.load(torch.device("cpu"), torch.float32)
        model.configure_training()
        with torch.no_grad():
            for parameter in model.trainable_parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    assert model.options.detach_unconditional == detach
    model.denoiser.double()

    def as_batch(embeds):
        if isinstance(embeds, dict):
            return {key: value.double().expand(2, *value.shape[1:]) for key, value in embeds.items()}
        return embeds.double().expand(2, *embeds.shape[1:])

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, *model.sample_shape(), generator=generator, dtype=torch.float64)
    timesteps = torch.tensor([700.0, 300.0], dtype=torch.float64) if name == "sd3" else torch.tensor([701, 301])
    embeds = as_batch(model.encode_prompts(["a cat", "a dog"]))
    model.negative_embeds = as_batch(model.negative_embeds)
    negative = model.negative_embeds
    projection = torch.randn(sample.shape, generator=generator, dtype=torch.float64)
    parameters = model.trainable_parameters()

    def gradient(prompt_embeds, scale):
        output = model.predict_noise(sample, timesteps, prompt_embeds, scale)
        return torch.autograd.grad((output * projection).sum(), parameters)

    weight = 4.5
    guided, conditional, unconditional = gradient(embeds, weight), gradient(embeds, 1.0), gradient(negative, 1.0)
    both = [weight * c - (weight - 1) * u for c, u in zip(conditional, unconditional, strict=True)]
    detached = [weight * c for c in conditional]
    expected, other = (detached, both) if detach else (both, detached)
    scale = max(float(hand.abs().max()) for hand in expected)
    # float64 but for predict_noise's float32 output: agreement to ~1e-7 of the largest entry
    assert max(float((ours - hand).abs().max()) for ours, hand in zip(guided, expected, strict=True)) <= 1e-6 * scale
    assert max(float((wrong - hand).abs().max()) for wrong, hand in zip(other, expected, strict=True)) > 1e-2 * scale


def test_flow_grpo_groups_by_prompt_with_the_global_std():
    """Flow-GRPO's PerPromptStatTracker (stat_tracking.py:16-31): every reward of a prompt in the epoch is one group,
    whichever sampling group it came from; with global_std the std of all rewards."""
    rewards = np.array([1.0, 3.0, 2.0, 6.0, 0.5, 0.5])
    prompts = ["cat", "cat", "dog", "cat", "dog", "dog"]
    advantages, flat = group_advantages(rewards, prompts, global_std=True)
    cats, dogs = np.mean([1.0, 3.0, 6.0]), np.mean([2.0, 0.5, 0.5])
    std = np.std(rewards) + 1e-4
    assert advantages == pytest.approx([(1 - cats) / std, (3 - cats) / std, (2 - dogs) / std, (6 - cats) / std,
                                        (0.5 - dogs) / std, (0.5 - dogs) / std])
    assert flat == 0


@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("group_by", ["group", "prompt"])
def test_grpo_advantages_follow_its_options(global_std, group_by, tiny_ddpm, tmp_path):
    """The algorithm's advantages of this process's samples, from every process's rewards, by hand: (r - mean of the
    group) / (std + 1e-4), the group the sampled group or the prompt, the std the group's or the epoch's."""
    from test_algorithms import make_run

    from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization

    algorithm = GroupRelativePolicyOptimization({"group_size": 2, "global_std": global_std, "group_by": group_by})
    run, trajectory = make_run(tiny_ddpm, algorithm, tmp_path, batch_size=4, grad_accum=1)
    rewards = [1.0, 3.0, 2.0, 6.0, 0.5, 0.7, 4.0, 4.0]
    prompts = ["cat", "cat", "dog", "dog", "cat", "cat", "dog", "dog"]
    trajectory.group_ids = torch.arange(8) // 2
    run.gathered_rewards, run.gathered_prompts = torch.tensor(rewards), prompts
    groups = [index // 2 for index in range(8)] if group_by == "group" else prompts
    expected = []
    for index, reward in enumerate(rewards):
        members = np.array([r for r, g in zip(rewards, groups) if g == groups[index]])
        std = np.std(rewards) if global_std else members.std()
        expected.append((reward - members.mean()) / (std + 1e-4))
    assert algorithm.compute_advantages(run, trajectory).tolist() == pytest.approx(expected, rel=1e-6)
    assert algorithm.zero_std_groups == (1 if group_by == "group" else 0)  # the two 4.0s


@pytest.mark.parametrize(("advantages", "kept_rows"), [
    ([0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 2.0, 0.0], 4),  # 3 non-zero, topped up to 4 = 2 minibatches of 2
    ([0.0] * 8, 2),  # none: one sample per minibatch
    ([1.0] * 8, 8),  # all
])
def test_dropping_zero_advantages_keeps_the_minibatch_count_and_tops_up_evenly(advantages, kept_rows, tiny_ddpm,
                                                                               tmp_path):
    """Flow-GRPO (train_sd3.py:796-817): samples whose advantage is 0 are left out, and zero-advantage ones are put
    back at random until the count divides into the same number of minibatches."""
    from test_algorithms import make_run

    from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization

    algorithm = GroupRelativePolicyOptimization({"drop_zero_advantages": True, "group_size": 2})
    run, trajectory = make_run(tiny_ddpm, algorithm, tmp_path, batch_size=4, grad_accum=1)
    trajectory.advantages = torch.tensor(advantages)
    trained, batch_size = algorithm.trained_samples(run, trajectory)
    assert trained.batch_size == kept_rows and batch_size == kept_rows // 2
    nonzero = [index for index, value in enumerate(advantages) if value]
    kept = [int(torch.nonzero((trajectory.latents == row).flatten(1).all(dim=1))) for row in trained.latents]
    assert set(nonzero) <= set(kept) and len(set(kept)) == kept_rows
    metrics = algorithm.update(run, trajectory)
    assert metrics["grpo/trained_samples"] == kept_rows and metrics["train/optimizer_steps"] == 2
