"""DiffusionNFT: its loss against a float64 transcription of the official code's, the forward-process mechanics it
trains on (re-noising at given times, the clean state an output implies), the old policy (soft update, sampling
with it), an update that must not move the weights, a run on the tiny SD3 pipeline, and learning on digits."""

import pytest
import torch

from helpers import assert_learned, flow_scheduler, learning_cases, learning_run, read_metrics
from ddpo.core.math.forward import renoising_steps
from ddpo.core.math.samplers import DDIMSampler, FlowSDESampler
from ddpo.plugins.algorithms.nft import (DiffusionNFT, OldPolicy, negative_aware_loss, optimality,
                                         regression_loss)


def official_flow_loss(x0, noise, t, v, v_old, r, beta, clip_max):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py:866-960 in float64, one sample at a time: x_t, the implicit
    positive and negative velocities, their x0 errors over the detached mean |error| (clipped at 1e-5), the
    r-weighted sum over beta, times adv_clip_max, averaged over the batch. Returns (loss, per-sample positive and
    negative losses); `v` may carry a gradient."""
    total, positives, negatives = 0, [], []
    for b in range(x0.shape[0]):
        xt = (1 - t[b]) * x0[b] + t[b] * noise[b]
        positive = beta * v[b] + (1 - beta) * v_old[b]
        negative = (1 + beta) * v_old[b] - beta * v[b]
        terms = []
        for prediction in (positive, negative):
            error = xt - t[b] * prediction - x0[b]
            weight = max(float(error.detach().abs().mean()), 1e-5)
            terms.append((error**2).mean() / weight)
        positives.append(terms[0])
        negatives.append(terms[1])
        total = total + (r[b] * terms[0] / beta + (1 - r[b]) * terms[1] / beta) * clip_max
    return total / x0.shape[0], torch.stack(positives), torch.stack(negatives)


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_and_its_gradient_equal_the_official_code_in_float64(beta):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4, 8, 8)
    x0, noise, v_old = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    v = (v_old + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    sampler = FlowSDESampler(flow_scheduler(10))
    timesteps = sampler.scheduler.timesteps[[0, 4, 8]].float()  # sigma 1, and two of the shifted schedule
    sigma = (timesteps / 1000).double()
    r = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    expected, positive, negative = official_flow_loss(x0, noise, sigma, v, v_old, r, beta, clip_max=5.0)
    expected_gradient, = torch.autograd.grad(expected, v)

    ours_v = v.detach().float().requires_grad_(True)
    noisy, used, target = sampler.noised(x0.float(), noise.float(), timesteps)
    assert torch.equal(used, timesteps)
    assert torch.allclose(noisy.double(), (1 - sigma.reshape(-1, 1, 1, 1)) * x0 + sigma.reshape(-1, 1, 1, 1) * noise,
                          atol=1e-6)
    losses, ours_positive, ours_negative = negative_aware_loss(
        ours_v, v_old.float(), r.float(), beta,
        lambda output: regression_loss(sampler.predicted_original(output, noisy, used) - x0.float(), adaptive=True))
    loss = 5.0 * losses.mean()
    gradient, = torch.autograd.grad(loss, ours_v)

    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert torch.allclose(ours_positive.double(), positive.detach(), rtol=1e-5)
    assert torch.allclose(ours_negative.double(), negative.detach(), rtol=1e-5)
    assert torch.allclose(gradient.double(), expected_gradient, rtol=1e-4, atol=1e-9)


def test_at_the_old_policy_the_gradient_is_two_r_minus_one_times_the_regressions():
    """At v_theta = v_old the implicit policies coincide and d/dv [(r l(v+) + (1 - r) l(v-)) / beta] =
    (2r - 1) l'(v_old): r = 1/2 teaches nothing, r > 1/2 descends the sample's regression, r < 1/2 ascends it."""
    generator = torch.Generator().manual_seed(1)
    target, v_old = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    for r in (0.5, 0.9, 0.1):
        v = v_old.clone().requires_grad_(True)
        losses, _, _ = negative_aware_loss(v, v_old, torch.full((2,), r), 0.7,
                                           lambda output: regression_loss(output - target, adaptive=False))
        gradient, = torch.autograd.grad(losses.sum(), v)
        regression = 2 * (v_old - target) / v_old[0].numel()  # d mean((v - target)^2) / dv
        assert torch.allclose(gradient, (2 * r - 1) * regression, atol=1e-7), r


def test_optimality_maps_clipped_advantages_onto_zero_one():
    advantages = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 5.0, 9.0])
    assert optimality(advantages, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0, 1.0])


def test_ddim_predicted_original_inverts_the_forward_process_unclipped():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; the true eps at x_t gives back x0, also beyond the scheduler's
    clip_sample range (a loss must see the unclipped value)."""
    from diffusers import DDIMScheduler

    sampler = DDIMSampler(DDIMScheduler(num_train_timesteps=1000, clip_sample=True))
    generator = torch.Generator().manual_seed(2)
    x0, noise = 3 * torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 3, 4, 4, generator=generator)
    timesteps = torch.tensor([999, 49])
    noisy, used, target = sampler.noised(x0, noise, timesteps)
    alpha = sampler.scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
    assert torch.allclose(noisy, alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, atol=1e-6)
    assert torch.equal(target, noise) and torch.equal(used, timesteps)
    assert torch.allclose(sampler.predicted_original(target, noisy, used), x0, atol=1e-3)


def test_renoising_steps_are_each_samples_own_random_subset():
    steps = renoising_steps(6, 10, 0.99, torch.Generator().manual_seed(0))
    assert steps.shape == (6, 9)
    assert all(len(set(row.tolist())) == 9 and max(row.tolist()) < 10 for row in steps)
    assert len({tuple(row.tolist()) for row in steps}) == 6
    assert renoising_steps(2, 10, 0.01, torch.Generator()).shape == (2, 1)  # at least one


def test_old_policy_soft_update_and_sampling_with_it():
    layer = torch.nn.Linear(3, 2)
    parameters = dict(layer.named_parameters())
    old = OldPolicy(parameters)
    start = {name: parameter.detach().clone() for name, parameter in parameters.items()}
    with torch.no_grad():
        for parameter in parameters.values():
            parameter.add_(1.0)
    old.soft_update(0.25)  # 0.25 old + 0.75 new = start + 0.75
    for name, parameter in parameters.items():
        assert torch.allclose(old.weights[name], start[name] + 0.75)
    with old.applied():
        assert all(torch.equal(parameter, old.weights[name]) for name, parameter in parameters.items())
    assert all(torch.allclose(parameter, start[name] + 1.0) for name, parameter in parameters.items())


@pytest.fixture
def nft_sd3_run(tiny_sd3, tmp_path):
    from accelerate import Accelerator

    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.engine.run import Run
    from ddpo.plugins.models.sd3 import StableDiffusion3

    model = StableDiffusion3({"pretrained": str(tiny_sd3), "lora_rank": 4})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    config = resolve_config(None, ["sample.batch_size=4", "sample.batches_per_epoch=1", "algorithm.group_size=2",
                                   "algorithm.kl_beta=0", "train.batch_size=2", "train.grad_accum=2",
                                   "train.weight_decay=0", "sample.num_steps=3", "train.timestep_fraction=1"],
                            {"model": {"name": "sd3"}, "algorithm": {"name": "diffusion-nft"}})
    algorithm = DiffusionNFT(config.algorithm.options())
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0)
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    run = Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=algorithm,
              prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)
    algorithm.setup(run)
    return run


def test_an_update_with_every_optimality_one_half_leaves_the_weights_where_they_are(nft_sd3_run):
    """r = 1/2 everywhere: at v_theta = v_old the positive and negative terms' gradients cancel exactly, so every
    step has gradient 0 and AdamW (no weight decay) moves nothing; with advantages of both signs it moves."""
    from ddpo.core.engine.rollout import sample_batch

    run = nft_sd3_run
    trajectory, _ = sample_batch(run.model, ["a cat", "a cat", "a dog", "a dog"], [{}] * 4, num_steps=3, eta=0.0,
                                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    start = [parameter.detach().clone() for parameter in run.model.trainable_parameters()]
    trajectory.advantages = torch.zeros(4)
    metrics = run.algorithm.update(run, trajectory)
    assert metrics["train/optimizer_steps"] == 1 and metrics["diffusion-nft/optimality_mean"] == 0.5
    assert all(torch.equal(before, after) for before, after in zip(start, run.model.trainable_parameters()))
    trajectory.advantages = torch.tensor([2.0, -2.0, 1.0, -1.0])
    metrics = run.algorithm.update(run, trajectory)
    assert metrics["diffusion-nft/old_decay"] == pytest.approx(0.002)  # 2 optimizer steps so far x 0.001
    assert not all(torch.equal(before, after) for before, after in zip(start, run.model.trainable_parameters()))


def test_diffusion_nft_runs_on_the_tiny_sd3_pipeline_and_trains_its_lora(tiny_sd3, forked_cli, tmp_path):
    from safetensors.torch import load_file

    result = forked_cli.run("run", "--algo", "diffusion-nft", "--model", "sd3", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sd3}", "--set", "model.lora_rank=4",
                            "--set", "algorithm.group_size=2", "--set", "sample.batch_size=4",
                            "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=3",
                            "--set", "train.batch_size=2", "--set", "train.grad_accum=1",
                            "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "nft")
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = read_metrics(tmp_path / "nft")
    # run_defaults: ODE sampling (eta 0), no guidance, int(3 x 0.99) = 2 re-noising times per image; two optimizer
    # steps (a minibatch of 2 images each), after which the old policy moved by 1 - 0.002
    assert record["train/optimizer_steps"] == 2 and record["diffusion-nft/old_decay"] == pytest.approx(0.002)
    assert record["loss/total"] == pytest.approx(record["loss/policy"] + 1e-4 * record["loss/kl"], rel=1e-5)
    assert record["loss/kl"] > 0  # LoRA's B is 0 until the first step: the second step's passes have moved
    weights = load_file(str(tmp_path / "nft" / "checkpoints" / "epoch_0001" / "weights.safetensors"))
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b)  # some of the tiny model's get no gradient


NFT_THRESHOLD, NFT_EPOCHS = 0.15, 8


@pytest.mark.slow
@pytest.mark.parametrize("target, seed, shuffled", learning_cases([(7, 0), (8, 0), (8, 1)], control=(8, 0)))
def test_diffusion_nft_learns_digits_targets_from_their_rewards_not_from_shuffled_ones(forked_cli, tmp_path, target,
                                                                                       seed, shuffled):
    """diffusion-nft's digits recipe (`model_run_defaults`: 128 images per epoch from the stochastic DDIM sampler, each
    re-noised at 5 of its 20 times, the official weighting, lr 5e-4, no KL), 8 epochs. `reward_rise` on targets
    3 / 7 / 8 x seeds 0, 1: 0.70 0.01 / 0.48 0.49 / 0.78 0.83 (benchmarks/bench_learning_tests.py, AMD EPYC). Target 3
    seed 1 did not learn (and its legibility fell to 0.77), so target 3 is not asserted; over targets 7 / 8 x seeds
    0, 1 the std is 0.162. The pairs asserted rose 0.48, 0.78 and 0.83: at least 0.329 over the 0.15 threshold, more
    than 2 x 0.162. The control, (8, 0) with shuffled rewards, rose -0.13: 0.28 under the threshold. The lowest
    legibility of an asserted run was 0.93. With deterministic sampling (`sample.eta=0`) the first updates moved the
    class mix at random (target 8 seed 0 fell 0.15 -> 0.01, a shuffled control rose 0.06 -> 0.25), and only (3, 0)
    of four pairs learned. 37-40 CPU seconds a run in the bench (a fresh interpreter each, about 7 of imports)."""
    records = learning_run(forked_cli, tmp_path, "diffusion-nft", target, seed, NFT_EPOCHS, shuffled=shuffled)
    assert_learned(records, shuffled, NFT_THRESHOLD, min_legibility=0.9)
