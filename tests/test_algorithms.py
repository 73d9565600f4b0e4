"""The algorithms' updates on real trajectories of a tiny pipeline, and the advantage math they consume."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from ddpo.core.advantages import PerPromptStatTracker, batch_advantages
from ddpo.core.config import resolve_config
from ddpo.core.rollout import sample_batch
from ddpo.core.run import Run
from ddpo.plugins.algorithms.ddpo import DDPOImportanceSampling, DDPOScoreFunction
from ddpo.plugins.models.ddpm import PixelDDPM


def make_run(tiny_ddpm, algorithm, tmp_path, **train):
    """A Run around the tiny DDPM (trained in full) and one batch of 8 trajectories sampled from it."""
    model = PixelDDPM({"pretrained": str(tiny_ddpm)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    sets = [f"train.{key}={value}" for key, value in train.items()]
    config = resolve_config(None, ["sample.num_steps=6", "sample.batch_size=8", "sample.batches_per_epoch=1", *sets],
                            {"model": {"name": "ddpm"}})
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.train.learning_rate)
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    run = Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=algorithm,
              prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)
    trajectory, _ = sample_batch(model, [""] * 8, [{}] * 8, num_steps=6, eta=1.0, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(0))
    return run, trajectory


def log_probs_of(model, trajectory, config):
    """(B, T) log-probabilities of the trajectory's steps under the model's current weights."""
    columns = []
    with torch.no_grad():
        for step in range(trajectory.num_steps):
            transitions = trajectory.transitions(torch.full((trajectory.batch_size,), step))
            log_prob, *_ = model.step_log_prob(transitions, config.sample.eta, config.sample.guidance_scale)
            columns.append(log_prob)
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("algorithm_cls", [DDPOImportanceSampling, DDPOScoreFunction])
def test_an_update_makes_positive_advantage_actions_more_likely(algorithm_cls, tiny_ddpm, tmp_path):
    run, trajectory = make_run(tiny_ddpm, algorithm_cls(), tmp_path, learning_rate=1e-5, batch_size=4, grad_accum=2)
    model = run.model
    trajectory.advantages = torch.tensor([1.0, -1.0] * 4)
    policy = trajectory.policy_steps
    before = log_probs_of(model, trajectory, run.config)
    assert torch.equal(before[policy], trajectory.log_probs[policy])  # nothing changed yet: ratio exactly 1

    metrics = run.algorithm.update(run, trajectory)

    after = log_probs_of(model, trajectory, run.config)
    change = torch.where(policy, after - before, torch.zeros_like(after)).sum(dim=1)
    assert (change[trajectory.advantages > 0] > 0).all() and (change[trajectory.advantages < 0] < 0).all(), change
    assert metrics["train/optimizer_steps"] == 1  # IS: 8 samples / (4 x grad_accum 2); SF: one per epoch
    assert np.isfinite(list(metrics.values())).all()


def test_ppo_loss_is_clipped_outside_the_trust_region(tiny_ddpm, tmp_path):
    # With a large learning rate the second minibatch sees ratios far outside 1 +- 1e-4: clipfrac > 0.
    run, trajectory = make_run(tiny_ddpm, DDPOImportanceSampling(), tmp_path, learning_rate=1e-3, batch_size=4,
                               grad_accum=1)
    trajectory.advantages = torch.linspace(-1, 1, 8)
    metrics = run.algorithm.update(run, trajectory)
    assert metrics["train/optimizer_steps"] == 2
    assert 0 < metrics["policy/clipfrac"] <= 0.5  # the first minibatch runs at ratio 1: never clipped


def test_per_prompt_stat_tracker_matches_a_hand_computation():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["cat", "cat", "dog", "cat"]
    rewards = np.array([1.0, 2.0, 10.0, 3.0])
    advantages = tracker.update(prompts, rewards)
    cat = np.array([1.0, 2.0, 3.0])  # 3 cat rewards >= min_count: the cat buffer's statistics
    assert advantages[[0, 1, 3]] == pytest.approx((cat - cat.mean()) / (cat.std() + 1e-6))
    assert advantages[2] == pytest.approx((10.0 - rewards.mean()) / (rewards.std() + 1e-6))  # dog: batch stats
    tracker.update(["cat", "cat"], np.array([4.0, 5.0]))
    assert list(tracker.buffers["cat"]) == [2.0, 3.0, 4.0, 5.0]  # the buffer keeps the newest buffer_size
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.update(["cat"], np.array([1.0])) == pytest.approx(tracker.update(["cat"], np.array([1.0])))


def test_batch_advantages_are_standardised():
    advantages = batch_advantages(np.array([1.0, 2.0, 3.0, 6.0]))
    assert advantages.mean() == pytest.approx(0) and advantages.std() == pytest.approx(1, abs=1e-5)


def kl_to_reference(model, trajectory, config):
    """Mean Gaussian KL per element from the model's step distributions to the pretrained model's, over the
    trajectory's policy steps (the deterministic last step has no distribution)."""
    from ddpo.core.policy import gaussian_kl, reference_step

    values = []
    with torch.no_grad():
        for step in range(trajectory.num_steps):
            transitions = trajectory.transitions(torch.full((trajectory.batch_size,), step))
            _, mean, std, _ = model.step_log_prob(transitions, config.sample.eta, config.sample.guidance_scale)
            reference_mean, _ = reference_step(model, transitions, config.sample.eta, config.sample.guidance_scale)
            values.append(gaussian_kl(mean, reference_mean, std)[trajectory.policy_steps[:, step]])
    return torch.cat(values).mean().item()


def test_ddpo_is_kl_weight_holds_the_policy_near_the_pretrained_model(tiny_ddpm, tmp_path):
    """The optional KL term (off by default: DDPO as published) pulls reward-blind directions back: the same
    update with a large weight ends nearer the reference than without it."""
    assert not DDPOImportanceSampling().needs_reference
    distances = {}
    for weight in (0.0, 50.0):
        algorithm = DDPOImportanceSampling({"clip_range": 0.2, "kl_weight": weight})
        run, trajectory = make_run(tiny_ddpm, algorithm, tmp_path / str(weight), learning_rate=1e-3, batch_size=2,
                                   grad_accum=1)
        run.model.prepare_reference()
        assert kl_to_reference(run.model, trajectory, run.config) == 0.0  # the reference is the starting policy
        trajectory.advantages = torch.linspace(-1, 1, 8)
        metrics = run.algorithm.update(run, trajectory)
        assert ("loss/kl" in metrics) == (weight > 0) and metrics["train/optimizer_steps"] == 4
        distances[weight] = kl_to_reference(run.model, trajectory, run.config)
    assert 0 < distances[50.0] < 0.7 * distances[0.0], distances


@pytest.mark.parametrize("fraction, inner_epochs", [(1.0, 1), (0.5, 2)])
def test_an_update_trains_timestep_fraction_of_the_steps_for_each_inner_epoch(fraction, inner_epochs, tiny_ddpm,
                                                                             tmp_path):
    run, trajectory = make_run(tiny_ddpm, DDPOImportanceSampling(), tmp_path, learning_rate=1e-5, batch_size=4,
                               grad_accum=1, timestep_fraction=fraction, inner_epochs=inner_epochs)
    trajectory.advantages = torch.linspace(-1, 1, 8)
    trained_steps = []
    step_log_prob = run.model.step_log_prob

    def counting(transitions, *args, **kwargs):
        trained_steps.extend(transitions.steps.tolist())
        return step_log_prob(transitions, *args, **kwargs)

    run.model.step_log_prob = counting
    metrics = run.algorithm.update(run, trajectory)
    policy_steps = int(trajectory.policy_steps[0].sum())
    per_sample = max(1, int(policy_steps * fraction))
    assert len(trained_steps) == inner_epochs * 8 * per_sample  # every sample, `per_sample` of its steps
    assert set(trained_steps) <= set(trajectory.policy_steps[0].nonzero().flatten().tolist())
    assert metrics["train/optimizer_steps"] == inner_epochs * 2  # 8 samples / batch 4, per inner epoch
