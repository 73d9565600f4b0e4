"""The algorithms' updates on real trajectories of a tiny pipeline, the advantage math they consume, and the
gradient clipping their optimizer steps apply."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from ddpo.core.configuration.config import resolve_config
from ddpo.core.engine.rollout import sample_batch
from ddpo.core.engine.run import Run
from ddpo.core.math.advantages import PerPromptStatTracker, batch_advantages
from ddpo.plugins.algorithms.d3po import D3PO
from ddpo.plugins.algorithms.ddpo import DDPOImportanceSampling, DDPOScoreFunction
from ddpo.plugins.algorithms.dpok import DPOK
from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization
from ddpo.plugins.algorithms.tdpo import TemporalDPO
from ddpo.plugins.models.ddpm import PixelDDPM


def make_run(tiny_ddpm, algorithm, tmp_path, optimizer=torch.optim.AdamW, **train):
    """A Run around the tiny DDPM (trained in full, by `optimizer`) and one batch of 8 trajectories sampled
    from it."""
    model = PixelDDPM({"pretrained": str(tiny_ddpm)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    sets = [f"train.{key}={value}" for key, value in train.items()]
    config = resolve_config(None, ["sample.num_steps=6", "sample.batch_size=8", "sample.batches_per_epoch=1", *sets],
                            {"model": {"name": "ddpm"}})
    accelerator = Accelerator(cpu=True)
    optimizer = optimizer(model.trainable_parameters(), lr=config.train.learning_rate)
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
    trajectory.advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 2.0, -0.5])
    policy = trajectory.policy_steps
    before = log_probs_of(model, trajectory, run.config)
    assert torch.equal(before[policy], trajectory.log_probs[policy])  # nothing changed yet: ratio exactly 1

    metrics = run.algorithm.update(run, trajectory)

    after = log_probs_of(model, trajectory, run.config)
    change = torch.where(policy, after - before, torch.zeros_like(after)).sum(dim=1)
    assert (change[trajectory.advantages > 0] > 0).all() and (change[trajectory.advantages < 0] < 0).all(), change
    assert metrics["train/optimizer_steps"] == 1  # IS: 8 samples / (4 x grad_accum 2); SF: one per epoch
    # The one step comes after every pass, all of them at the sampling policy: ratio 1, so IS's loss is
    # mean(-A) and SF's -mean(A log p_old) over every (sample, policy step).
    assert metrics["policy/ratio_mean"] == 1 and metrics["policy/approx_kl"] == 0
    assert metrics["policy/ratio_dev_first"] == 0
    old = trajectory.log_probs.double()
    expected = (-trajectory.advantages.double().mean() if algorithm_cls is DDPOImportanceSampling
                else -(trajectory.advantages.double()[:, None] * old)[policy].mean())
    assert metrics["loss/policy"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)


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
    from ddpo.core.math.policy import gaussian_kl, reference_step

    values = []
    with torch.no_grad():
        for step in range(trajectory.num_steps):
            transitions = trajectory.transitions(torch.full((trajectory.batch_size,), step))
            _, mean, std, _ = model.step_log_prob(transitions, config.sample.eta, config.sample.guidance_scale)
            reference_mean, _ = reference_step(model, transitions, config.sample.eta, config.sample.guidance_scale)
            values.append(gaussian_kl(mean, reference_mean, std)[trajectory.policy_steps[:, step]])
    return torch.cat(values).mean().item()


@pytest.mark.parametrize("algorithm_cls, options, optimizer_steps", [
    (DDPOImportanceSampling, {}, 4),
    (TemporalDPO, {"critic_features": "pixels"}, 20),  # one step per minibatch of 2 at each of 5 positions
], ids=["ddpo-is", "tdpo"])
def test_kl_weight_holds_the_policy_near_the_pretrained_model(algorithm_cls, options, optimizer_steps, tiny_ddpm,
                                                              tmp_path):
    """The optional KL term (off by default: DDPO and TDPO as published) pulls reward-blind directions back: the
    same update with a large weight ends nearer the reference than without it."""
    assert not algorithm_cls().needs_reference
    distances = {}
    for weight in (0.0, 50.0):
        algorithm = algorithm_cls({**options, "clip_range": 0.2, "kl_weight": weight})
        run, trajectory = make_run(tiny_ddpm, algorithm, tmp_path / str(weight), learning_rate=1e-3, batch_size=2,
                                   grad_accum=1)
        run.model.prepare_reference()
        assert kl_to_reference(run.model, trajectory, run.config) == 0.0  # the reference is the starting policy
        if isinstance(algorithm, TemporalDPO):
            algorithm.setup(run)
            run.gathered_rewards = torch.linspace(0, 1, 8)
            trajectory.advantages = algorithm.compute_advantages(run, trajectory)
        else:
            trajectory.advantages = torch.linspace(-1, 1, 8)
        metrics = run.algorithm.update(run, trajectory)
        assert ("loss/kl" in metrics) == (weight > 0) and metrics["train/optimizer_steps"] == optimizer_steps
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


@pytest.mark.parametrize("algorithm", [
    lambda: DDPOImportanceSampling({"clip_range": 0.2, "kl_weight": 0.5}), DDPOScoreFunction,
    lambda: DPOK({"value_baseline": False}), lambda: GroupRelativePolicyOptimization({"kl_beta": 0.5}), D3PO,
], ids=["ddpo-is", "ddpo-sf", "dpok", "grpo", "d3po"])
def test_stacking_steps_in_one_pass_gives_the_same_update(algorithm, tiny_ddpm, tmp_path):
    """`train.steps_per_pass` only batches the forward passes: 5 policy steps in passes of 3 and 2 (a remainder)
    give the update of one pass per step. SGD, so that the weights move by exactly lr x gradient."""
    results = []
    for steps_per_pass in (1, 3):
        run, trajectory = make_run(tiny_ddpm, algorithm(), tmp_path / str(steps_per_pass), optimizer=torch.optim.SGD,
                                   learning_rate=1.0, batch_size=4, grad_accum=2, steps_per_pass=steps_per_pass)
        if run.algorithm.needs_reference:
            run.model.prepare_reference()
        trajectory.rewards = torch.tensor([0.9, 0.1, 0.2, 0.8, 0.5, 0.5, 0.3, 0.7])  # d3po: 3 pairs and a tie
        trajectory.group_ids = torch.arange(8) // 2
        trajectory.advantages = torch.linspace(-1, 1, 8)
        passes = []
        step_log_prob = run.model.step_log_prob

        def counting(transitions, *args, **kwargs):
            passes.append(len(transitions.steps))
            return step_log_prob(transitions, *args, **kwargs)

        run.model.step_log_prob = counting
        start = [parameter.detach().clone() for parameter in run.model.trainable_parameters()]
        metrics = run.algorithm.update(run, trajectory)
        moved = [parameter.detach() - before for parameter, before in zip(run.model.trainable_parameters(), start,
                                                                           strict=True)]
        results.append((passes, metrics, torch.cat([change.flatten() for change in moved])))
    assert trajectory.num_train_steps() == 5  # so passes of 3 steps leave a remainder of 2
    (single_passes, single, single_moved), (stacked_passes, stacked, stacked_moved) = results
    assert set(single_passes) == {4} and set(stacked_passes) == {12, 8}  # rows: 4 trajectories x steps
    assert sum(stacked_passes) == sum(single_passes)
    assert stacked["train/optimizer_steps"] == single["train/optimizer_steps"]
    assert single_moved.abs().max() > 1e-4  # the update moved the weights
    torch.testing.assert_close(stacked_moved, single_moved, rtol=1e-4, atol=1e-6)
    for tag in ("loss/policy", "loss/total", "policy/approx_kl", "policy/ratio_mean"):  # epoch means over steps
        assert stacked[tag] == pytest.approx(single[tag], rel=1e-4, abs=1e-6), tag


def test_a_stacked_pass_counts_its_positions_and_may_not_run_past_an_optimizer_step(tiny_ddpm, tmp_path):
    run, _ = make_run(tiny_ddpm, DDPOImportanceSampling(), tmp_path, batch_size=4, grad_accum=2)
    accumulator = run.accumulator(4)
    parameter = run.model.trainable_parameters()[0]
    for size in (2, 2):  # two passes of 2 positions: one optimizer step of 4 micro-steps
        with accumulator.micro_step(size):
            accumulator.backward(parameter.sum())
    assert accumulator.optimizer_steps == 1
    with accumulator.micro_step(3):
        accumulator.backward(parameter.sum())
    with pytest.raises(ValueError, match="a pass of 2 micro-steps after 3 of 4 runs past the optimizer step"):
        with accumulator.micro_step(2):
            pass


@pytest.mark.parametrize("algorithm, module", [
    (lambda: TemporalDPO({"critic_features": "pixels"}), "critic"),
    (lambda: DPOK({"value_steps": 3, "value_micro_batches": 1, "value_batch_size": 16}), "value"),
], ids=["tdpo-critic", "dpok-value"])
def test_max_grad_norm_bounds_every_applied_step_in_the_raw_gradients_direction(algorithm, module, tiny_ddpm,
                                                                                tmp_path):
    """train.max_grad_norm = c clips each trained module on its own: every optimizer step applies
    g min(1, c / |g|) with g the raw (unclipped) gradient of that module at that step, the policy and the module
    the algorithm registered alike (TDPO's critic steps with the policy, DPOK's value network before it), and
    train/grad_norm logs the policy's raw norm. The raw gradients come from the same update with c = 1e9;
    recording optimizers leave the weights, so both updates see the same gradients."""
    from test_rwr import GradientRecorder

    def update(max_grad_norm):
        instance = algorithm()
        run, trajectory = make_run(tiny_ddpm, instance, tmp_path / str(max_grad_norm), batch_size=4, grad_accum=1,
                                   max_grad_norm=max_grad_norm)
        if instance.needs_reference:
            run.model.prepare_reference()
        torch.manual_seed(0)  # the critic's initial weights
        instance.setup(run)
        recorders = {name: GradientRecorder(run.modules[name].parameters()) for name in ("policy", module)}
        for name, recorder in recorders.items():
            run.modules[name].optimizer = recorder
        trajectory.rewards = run.gathered_rewards = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.4])
        trajectory.advantages = instance.compute_advantages(run, trajectory).clamp(-5, 5)
        torch.manual_seed(1)  # the critic's dropout
        metrics = instance.update(run, trajectory)
        return {name: torch.stack(recorder.steps).double() for name, recorder in recorders.items()}, metrics

    raw, _ = update(1e9)
    norms = {name: steps.norm(dim=1) for name, steps in raw.items()}
    limit = 0.5 * min(float(norm.max()) for norm in norms.values())  # every module has steps above it
    clipped, metrics = update(limit)
    for name in ("policy", module):
        assert clipped[name].shape == raw[name].shape and len(raw[name]) >= 2, name
        assert (norms[name] > limit).any(), name
        expected = raw[name] * (limit / norms[name]).clamp(max=1)[:, None]
        torch.testing.assert_close(clipped[name], expected, rtol=1e-4, atol=1e-6 * limit, msg=name)
        assert float(clipped[name].norm(dim=1).max()) <= limit * (1 + 1e-5), name
    assert metrics["train/grad_norm"] == pytest.approx(float(norms["policy"][-1]), rel=1e-5)
