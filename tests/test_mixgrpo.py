"""MixGRPO and `sample.sde_window`: the window's schedule against MixGRPO's (sliding) and Flow-GRPO-Fast's (random),
a windowed trajectory against a float64 hand computation (SDE steps inside the window with their log-probs,
Euler steps outside without), the config's refusals, `mixgrpo` on the tiny SD3 pipeline, and `mixgrpo` learning
on the digits task."""

import json
import math

import pytest
import torch
import yaml

from helpers import assert_learned, learning_cases, learning_run
from ddpo.core.configuration.config import SDEWindow
from ddpo.core.engine.rollout import sample_batch
from ddpo.plugins.models.sd3 import StableDiffusion3


def test_the_sliding_window_moves_as_mixgrpos_and_starts_over_when_a_whole_one_no_longer_fits():
    """MixGRPO's recipe: 25 steps, a window of 4 moving one step every 25 iterations (epochs here), from step 0."""
    window = SDEWindow(size=4, stride=1, shift_every=25)
    starts = [window.steps(25, epoch, seed=0)[0] for epoch in range(1, 25 * 22 + 1)]
    assert starts[:25] == [0] * 25 and starts[25:50] == [1] * 25
    assert window.steps(25, 26, seed=0) == (1, 5)
    # the last whole window below the default end (num_steps - 1 = 24) covers steps 20-23; then back to 0
    assert starts[25 * 20] == 20 and window.steps(25, 25 * 20 + 1, seed=0) == (20, 24)
    assert starts[25 * 21:] == [0] * 25
    assert SDEWindow(size=2, stride=3, start=1, end=9).steps(10, 4, seed=0) == (1, 3)  # starts 1, 4, 7, then 1
    assert {SDEWindow(size=2, stride=0).steps(10, epoch, seed=0) for epoch in range(1, 30)} == {(0, 2)}


def test_a_random_window_is_drawn_per_epoch_within_its_range_and_the_same_for_a_seed():
    """Flow-GRPO-Fast's placement (a start uniform in sde_window_range[0]..range[1] - size): here per epoch."""
    window = SDEWindow(size=3, placement="random", end=5)
    starts = [window.steps(10, epoch, seed=7)[0] for epoch in range(1, 61)]
    assert set(starts) == {0, 1, 2}
    assert starts == [window.steps(10, epoch, seed=7)[0] for epoch in range(1, 61)]
    assert starts != [window.steps(10, epoch, seed=8)[0] for epoch in range(1, 61)]


@pytest.fixture(scope="module")
def sd3_model(tiny_sd3):
    model = StableDiffusion3({"pretrained": str(tiny_sd3), "lora_rank": 4})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    return model


def test_inside_the_window_the_sde_with_its_log_prob_outside_the_euler_step_in_float64(sd3_model):
    steps, eta, guidance = 6, 0.7, 4.5
    trajectory, _ = sample_batch(sd3_model, ["cat", "dog"], [{}, {}], num_steps=steps, eta=eta,
                                 guidance_scale=guidance, generator=torch.Generator().manual_seed(0),
                                 sde_window=(2, 4))
    window = [2 <= step < 4 for step in range(steps)]
    assert trajectory.policy_steps.tolist() == [window, window] and trajectory.num_train_steps() == 2
    assert (trajectory.log_probs[:, [0, 1, 4, 5]] == 0).all()
    for step in range(steps):
        x, x_next = trajectory.latents[:, step].double(), trajectory.latents[:, step + 1].double()
        sigma = float(trajectory.timesteps[0, step]) / 1000
        dt = float(trajectory.prev_timesteps[0, step]) / 1000 - sigma
        with torch.no_grad():
            v = sd3_model.predict_noise(trajectory.latents[:, step], trajectory.timesteps[:, step],
                                        trajectory.prompt_embeds, guidance).double()
        if not window[step]:
            assert torch.allclose(x_next, x + dt * v, atol=1e-5), step
            continue
        noise_std = eta * math.sqrt(sigma / (1 - sigma))  # Flow-GRPO's SDE (sigma < 1 inside this window)
        mean = x * (1 + noise_std**2 * dt / (2 * sigma)) + v * (1 + noise_std**2 * (1 - sigma) / (2 * sigma)) * dt
        std = noise_std * math.sqrt(-dt)
        log_prob = (-(x_next - mean) ** 2 / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
        assert torch.allclose(trajectory.log_probs[:, step].double(), log_prob.flatten(1).mean(dim=1), rtol=1e-4)


@pytest.mark.parametrize("sets, message", [
    (["sample.sde_window.size=20"], "sample.sde_window: a window of 20 steps"),
    (["sample.sde_window.stride=1"], "sample.sde_window.size"),
    (["sample.sde_window.size=4", "model.scheduler=ddpm"], "DDPM ignores eta"),
    (["sample.sde_window=null"], "algorithm 'mixgrpo' trains a window"),
])
def test_a_window_that_cannot_work_is_refused_in_one_line(forked_cli, sets, message):
    result = forked_cli.run("config", "--algo", "mixgrpo", *[part for item in sets for part in ("--set", item)])
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_mixgrpo_runs_on_the_tiny_sd3_pipeline_training_only_its_window(tiny_sd3, forked_cli, tmp_path):
    result = forked_cli.run("run", "--algo", "mixgrpo", "--model", "sd3", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sd3}", "--set", "model.lora_rank=4",
                            "--set", "algorithm.group_size=4", "--set", "sample.batch_size=4",
                            "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
                            "--set", "sample.sde_window.size=2", "--set", "sample.sde_window.shift_every=1",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                            "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "mix")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    # windows of 2 below step 3 (of 4), moving every epoch: starting at 0, then 1
    assert [record["sample/sde_window_start"] for record in records] == [0.0, 1.0]
    for record in records:  # one optimizer step per epoch after the window's 2 steps: every pass at ratio 1
        assert record["policy/ratio_dev_first"] <= 1e-6 and record["train/optimizer_steps"] == 1
        assert record["loss/policy"] == pytest.approx(0, abs=1e-6)
    config = yaml.safe_load((tmp_path / "mix" / "config.yaml").read_text())
    assert config["sample"]["sde_window"]["size"] == 2 and config["algorithm"]["name"] == "mixgrpo"


MIXGRPO_THRESHOLD, MIXGRPO_EPOCHS = 0.06, 8


@pytest.mark.slow
@pytest.mark.parametrize("target, seed, shuffled", learning_cases([(3, 0), (3, 1), (8, 1)], control=(8, 1)))
def test_mixgrpo_learns_digits_targets_from_their_rewards_not_from_shuffled_ones(forked_cli, tmp_path, target, seed,
                                                                                shuffled):
    """mixgrpo's digits recipe (`model_run_defaults`): grpo's, with 10 of the 20 DDIM steps stochastic and trained,
    the window moving 2 steps every 2 epochs (steps 0-9, 2-11, 4-13, 6-15), 8 epochs. `reward_rise` on targets 3 / 8
    x seeds 0, 1: 0.436 0.656 / 0.133 0.449 (benchmarks/bench_learning_tests.py), std 0.187; the pairs asserted rose
    at least 0.436, 0.376 over the 0.06 threshold, more than 2 x 0.187. (8, 0) is weak (0.133: its reward went
    0.15 -> 0.28) and is not asserted. Controls with shuffled rewards: (8, 1) -0.024 (asserted) and (3, 0) -0.010.
    The lowest legibility of a run was 0.93. 32-35 CPU seconds a run
    (AMD EPYC, one thread, a loaded machine). MixGRPO's own window, 4 of the 20 steps moving one step every 2
    epochs, did not learn here in 8 epochs (rises 0.02 0.09 / -0.02 -0.07 on the same pairs)."""
    records = learning_run(forked_cli, tmp_path, "mixgrpo", target, seed, MIXGRPO_EPOCHS, shuffled=shuffled)
    assert_learned(records, shuffled, MIXGRPO_THRESHOLD, min_legibility=0.9)
