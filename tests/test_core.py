"""The core capabilities every algorithm builds on: the reference policy, log-probs from recorded step state,
transitions that carry every field, groups kept together, trained modules in checkpoints, advantages clipped
from any source, and the first-minibatch ratio check."""

import dataclasses
import random

import pytest
import torch
from accelerate import Accelerator

from conftest import run_cli
from helpers import make_distribution, read_metrics
from ddpo.core.configuration.config import SampleConfig, resolve_config
from ddpo.core.engine.checkpoint import load_checkpoint, save_checkpoint
from ddpo.core.engine.rollout import RolloutEngine, sample_batch
from ddpo.core.engine.run import Run
from ddpo.core.math.policy import clipped_surrogate
from ddpo.core.plugin_api.schema import Trajectory, Transitions, stack_transitions
from ddpo.plugins.algorithms.ddpo import DDPOImportanceSampling
from ddpo.plugins.models.ddpm import PixelDDPM
from ddpo.plugins.models.sd import StableDiffusion
from ddpo.plugins.prompts import Unconditional


def loaded(model_cls, directory, **options):
    model = model_cls({"pretrained": str(directory), **options})
    model.load(torch.device("cpu"), torch.float32)
    return model


def perturb(parameters, seed=0):
    """Move trainable weights away from their initial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def sd_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([700, 30]),
            torch.randn(2, 16, 32, generator=generator))


def test_reference_with_lora_is_the_untouched_pipeline_bit_for_bit_and_the_adapters_come_back(tiny_sd):
    policy = loaded(StableDiffusion, tiny_sd)
    policy.configure_training()
    perturb(policy.trainable_parameters())  # LoRA's B starts at zero: make the adapters matter
    policy.denoiser = Accelerator(cpu=True).prepare(policy.denoiser)
    base = loaded(StableDiffusion, tiny_sd)
    sample, timesteps, embeds = sd_inputs()
    with torch.no_grad():
        expected = base.predict_noise(sample, timesteps, embeds, guidance_scale=5.0)
        with policy.reference():
            reference = policy.predict_noise(sample, timesteps, embeds, guidance_scale=5.0)
    assert torch.equal(reference, expected)

    output = policy.predict_noise(sample, timesteps, embeds, guidance_scale=5.0)
    assert not torch.allclose(output, expected, atol=1e-4)  # the adapters are active again
    output.square().mean().backward()
    trainable = policy.trainable_parameters()
    assert trainable and all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in trainable)


def test_reference_with_all_weights_trained_is_a_frozen_copy_of_the_pretrained_model(tiny_ddpm):
    policy = loaded(PixelDDPM, tiny_ddpm)
    policy.configure_training()
    policy.prepare_reference()
    perturb(policy.trainable_parameters())
    base = loaded(PixelDDPM, tiny_ddpm)
    sample = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([900, 500, 10])
    with torch.no_grad():
        expected = base.predict_noise(sample, timesteps, None, 1.0)
        with policy.reference():
            reference = policy.predict_noise(sample, timesteps, None, 1.0)
    assert torch.equal(reference, expected)
    assert not any(parameter.requires_grad for parameter in policy.reference_denoiser.parameters())
    output = policy.predict_noise(sample, timesteps, None, 1.0)
    assert not torch.allclose(output, expected, atol=1e-4)
    output.square().mean().backward()
    assert all(parameter.grad is not None for parameter in policy.trainable_parameters())


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_log_probs_use_the_recorded_steps_not_the_schedulers_current_state(tiny_ddpm, scheduler):
    model = loaded(PixelDDPM, tiny_ddpm, scheduler=scheduler)
    trajectory, _ = sample_batch(model, [""] * 3, [{}] * 3, num_steps=8, eta=1.0, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(0))
    model.set_timesteps(20)  # e.g. an evaluation grid sampled with another step count
    policy = trajectory.policy_steps[0]
    with torch.no_grad():
        for step in policy.nonzero().flatten().tolist():
            transitions = trajectory.transitions(torch.full((3,), step))
            log_prob, *_ = model.step_log_prob(transitions, eta=1.0, guidance_scale=1.0)
            assert torch.equal(torch.exp(log_prob - transitions.log_probs), torch.ones(3)), step


def full_trajectory(batch=4, steps=3):
    """A trajectory with every optional field set to distinct values."""
    generator = torch.Generator().manual_seed(0)
    per_step = lambda: torch.randn(batch, steps, generator=generator)  # noqa: E731
    return Trajectory(
        latents=torch.randn(batch, steps + 1, 2, 3, 3, generator=generator),
        timesteps=torch.arange(steps, 0, -1).repeat(batch, 1), prev_timesteps=torch.arange(steps - 1, -1, -1).repeat(batch, 1),
        log_probs=per_step(), policy_steps=torch.ones(batch, steps, dtype=torch.bool),
        prompts=[f"p{index}" for index in range(batch)], prompt_metadata=[{"i": index} for index in range(batch)],
        prompt_embeds=torch.randn(batch, 5, 6, generator=generator), rewards=torch.randn(batch, generator=generator),
        advantages=per_step(), group_ids=torch.arange(batch) // 2, ref_log_probs=per_step(), values=per_step(),
        features=torch.randn(batch, steps + 1, 7, generator=generator),
        extras={"noise": torch.randn(batch, 2, generator=generator)})


def test_transitions_carry_every_field_of_the_trajectory():
    trajectory = full_trajectory()
    steps = torch.tensor([0, 2, 1, 1])
    transitions = trajectory.transitions(steps)
    rows = torch.arange(4)
    names = {item.name for item in dataclasses.fields(Transitions)}
    for item in dataclasses.fields(Trajectory):
        value, kind = getattr(trajectory, item.name), item.metadata["kind"]
        if item.name == "advantages":
            kind = "step"  # per-step advantages here
        if kind == "state":
            leaving, reaching = item.metadata["transition_names"]
            assert torch.equal(getattr(transitions, leaving), value[rows, steps])
            assert torch.equal(getattr(transitions, reaching), value[rows, steps + 1])
            names -= {leaving, reaching}
        elif kind == "step":
            assert torch.equal(getattr(transitions, item.name), value[rows, steps]), item.name
            names.discard(item.name)
        else:
            carried = getattr(transitions, item.name)
            assert carried is value or carried == value, item.name
            names.discard(item.name)
    assert names == {"steps", "positions"} and transitions.positions == 1


def test_stacked_positions_are_the_positions_one_after_the_other():
    trajectory = full_trajectory()
    trajectory.prompt_embeds = {"prompt_embeds": trajectory.prompt_embeds, "pooled": torch.randn(4, 2)}  # SD3's kind
    first, second = trajectory.transitions(torch.tensor([0, 2, 1, 1])), trajectory.transitions(torch.tensor([1, 0, 2, 0]))
    stacked = stack_transitions([first, second])
    assert stacked.positions == 2 and stack_transitions([first]) is first
    for item in dataclasses.fields(Transitions):
        value, one, two = getattr(stacked, item.name), getattr(first, item.name), getattr(second, item.name)
        if item.name == "positions":
            continue
        if isinstance(one, dict):
            assert set(value) == set(one) and all(torch.equal(value[key], torch.cat([one[key], two[key]])) for key in one)
        elif isinstance(one, list):
            assert value == one + two, item.name
        else:
            assert torch.equal(value, torch.cat([one, two])), item.name


def test_groups_train_together_at_the_same_step():
    trajectory = full_trajectory(batch=8, steps=5)
    seen = set()
    for transitions in trajectory.training_transitions(4, torch.Generator().manual_seed(0), group_size=2):
        for pair in range(2):
            rows = slice(2 * pair, 2 * pair + 2)
            assert transitions.group_ids[rows][0] == transitions.group_ids[rows][1]
            assert transitions.steps[rows][0] == transitions.steps[rows][1]
            seen.add((int(transitions.group_ids[rows][0]), int(transitions.steps[rows][0])))
    assert len(seen) == 4 * 5  # every group at every step, once
    with pytest.raises(ValueError, match="multiple of the group size 2"):
        next(trajectory.training_transitions(3, torch.Generator(), group_size=2))


def test_the_training_order_shuffles_the_samples_and_gives_each_its_own_step_order():
    """DDPO's order: the samples are shuffled into minibatches, and each sample visits its steps in its own random
    order, every (sample, step) once. Samples are told apart by their rewards."""
    trajectory = full_trajectory(batch=8, steps=5)
    identity = {round(float(reward), 6): row for row, reward in enumerate(trajectory.rewards)}
    first_minibatches = set()
    for seed in range(4):
        batches = list(trajectory.training_transitions(4, torch.Generator().manual_seed(seed)))
        assert len(batches) == 2 * 5
        orders = {}
        for transitions in batches:
            for reward, step in zip(transitions.rewards.tolist(), transitions.steps.tolist(), strict=True):
                orders.setdefault(identity[round(reward, 6)], []).append(step)
        assert all(sorted(order) == list(range(5)) for order in orders.values()) and len(orders) == 8
        assert len({tuple(order) for order in orders.values()}) >= 4, orders  # not one order shared by all
        first_minibatches.add(frozenset(identity[round(reward, 6)] for reward in batches[0].rewards.tolist()))
    assert len(first_minibatches) >= 3 and frozenset(range(4)) not in first_minibatches, first_minibatches


def test_group_ids_are_unique_across_processes(tiny_ddpm):
    model = loaded(PixelDDPM, tiny_ddpm)
    config = SampleConfig(batch_size=4, batches_per_epoch=2, num_steps=2, eta=1.0, guidance_scale=1.0)
    ids = []
    for process in (0, 1):
        engine = RolloutEngine(model, _MeanReward(), Unconditional(), config, group_size=2, process_index=process)
        trajectory, _ = engine.collect(torch.Generator().manual_seed(process), random.Random(0))
        engine.close()
        ids.append(trajectory.group_ids.tolist())
    assert ids == [[0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6, 7, 7]]


class _MeanReward:
    name = "mean"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def test_clipped_surrogate_matches_a_float64_hand_computation_and_clipped_terms_get_no_gradient():
    old = torch.zeros(4)
    log_prob = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.00005])).requires_grad_(True)
    advantages = torch.tensor([1.0, 2.0, -1.0, 3.0])
    loss, ratio = clipped_surrogate(log_prob, old, advantages, clip_range=0.1)
    rho = [1.0, 1.5, 0.5, 1.00005]
    a = [1.0, 2.0, -1.0, 3.0]
    terms = [max(-ai * r, -ai * min(max(r, 0.9), 1.1)) for ai, r in zip(a, rho)]
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)
    loss.backward()
    # rho 1.5 with A > 0 and rho 0.5 with A < 0 are clipped: no gradient; the others get -A rho / 4
    assert log_prob.grad[1] == 0 and log_prob.grad[2] == 0
    assert log_prob.grad[0].item() == pytest.approx(-1.0 / 4) and log_prob.grad[3].item() == pytest.approx(-3 * 1.00005 / 4, rel=1e-5)
    assert torch.equal(ratio.detach(), log_prob.detach().exp())


def test_ratio_statistics_match_hand_computations():
    """policy/approx_kl = mean(log_ratio^2) / 2, policy/ratio_mean, policy/clipfrac = share of |rho - 1| > eps, each
    an epoch mean weighted by the positions a pass stands for, and policy/ratio_dev_first = max |rho - 1| over the
    first minibatch's transitions only."""
    import math

    from ddpo.core.math.policy import EpochStatistics

    statistics = EpochStatistics()
    first = [math.log(1.5), 0.0, math.log(0.9)]  # ratios 1.5, 1, 0.9: the first minibatch
    later = [math.log(3.0), math.log(1.05)]  # ratios 3, 1.05, after a step, two positions stacked
    statistics.add_ratio(torch.tensor(first), torch.zeros(3), 0.2, first_minibatch=True)
    statistics.add_ratio(torch.tensor(later), torch.zeros(2), 0.2, first_minibatch=False, positions=2)
    summary = statistics.summary()

    def weighted(per_pass):  # the first pass counts once, the stacked one twice
        return (per_pass[0] + 2 * per_pass[1]) / 3

    approx_kl = [sum(x * x for x in first) / 6, sum(x * x for x in later) / 4]
    assert summary["policy/approx_kl"] == pytest.approx(weighted(approx_kl), rel=1e-6)
    assert summary["policy/ratio_mean"] == pytest.approx(weighted([3.4 / 3, 4.05 / 2]), rel=1e-6)
    assert summary["policy/clipfrac"] == pytest.approx(weighted([1 / 3, 1 / 2]))
    assert summary["policy/ratio_dev_first"] == pytest.approx(0.5, rel=1e-6)  # not 2.0, the later pass's


def test_the_first_minibatch_is_exactly_the_passes_before_the_first_optimizer_step(tiny_ddpm, tmp_path):
    """policy_passes flags the epoch's first minibatch (all its trained steps, stacked or not) and nothing after:
    the passes whose ratio must be exactly 1."""
    from test_algorithms import make_run

    from ddpo.core.math.policy import policy_passes

    for steps_per_pass, expected in ((1, [True] * 5 + [False] * 5), (2, [True] * 3 + [False] * 3)):
        run, trajectory = make_run(tiny_ddpm, DDPOImportanceSampling(), tmp_path / str(steps_per_pass), batch_size=4,
                                   grad_accum=1, steps_per_pass=steps_per_pass)
        accumulator = run.accumulator(5)
        flags = [first for _, first in policy_passes(run, trajectory, accumulator)]
        assert flags == expected, steps_per_pass
        assert accumulator.optimizer_steps == 2


def test_registered_modules_and_their_optimizers_are_checkpointed(tiny_ddpm, tmp_path):
    def make_run():
        model = loaded(PixelDDPM, tiny_ddpm)
        model.configure_training()
        config = resolve_config(None, [], {"model": {"name": "ddpm"}})
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
        run = Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=DDPOImportanceSampling(),
                  prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)
        torch.manual_seed(len(list(tmp_path.iterdir())))  # each call: other initial weights
        critic = torch.nn.Linear(3, 2)
        run.register_module("critic", critic, torch.optim.AdamW(critic.parameters(), lr=0.1))
        return run

    run = make_run()
    critic = run.modules["critic"]
    accumulator = run.accumulator(1, modules=("critic",))
    with accumulator.micro_step():
        accumulator.backward(critic.module(torch.ones(4, 3)).square().sum())
    save_checkpoint(run)
    restored = make_run()
    assert not torch.equal(restored.modules["critic"].module.weight, critic.module.weight)
    load_checkpoint(restored, tmp_path / "checkpoints" / "epoch_0001")
    assert torch.equal(restored.modules["critic"].module.weight, critic.module.weight)
    ours, theirs = restored.modules["critic"].optimizer.state_dict(), critic.optimizer.state_dict()
    assert torch.equal(ours["state"][0]["exp_avg"], theirs["state"][0]["exp_avg"]) and ours["state"][0]["step"] == 1


def hook_plugin(directory):
    """A plugin whose compute_advantages hook returns far too large advantages, and whose on_update_end hook logs
    the largest advantage the update saw (editing the metrics)."""
    return make_distribution(directory, "big_advantages",
        "import torch\nimport ddpo\n\nseen = {}\n\n\n"
        "@ddpo.hookimpl\ndef compute_advantages(run, trajectory):\n"
        "    seen['trajectory'] = trajectory\n"
        "    return torch.full((trajectory.batch_size,), 100.0)\n\n\n"
        "@ddpo.hookimpl\ndef on_update_end(metrics):\n"
        "    metrics['test/max_advantage'] = float(seen['trajectory'].advantages.abs().max())\n")


def test_advantages_from_a_hook_are_clipped_and_the_first_ratio_is_exactly_one(tmp_path):
    plugin = hook_plugin(tmp_path / "plugin")
    result = run_cli("run", "--epochs", "2", "--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1",
                     "--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--set", "sample.num_steps=4",
                     "--set", "advantage.clip_max=3", "--set", "algorithm.clip_range=1e-4", "--logdir", str(tmp_path), "--run-name", "hooked",
                     env={"PYTHONPATH": str(plugin)})
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "hooked")
    assert [record["test/max_advantage"] for record in records] == [3.0, 3.0]
    for record in records:
        assert record["policy/ratio_dev_first"] <= 1e-6, record  # the policy is the sampling policy until it steps
        assert record["policy/clipfrac"] > 0  # the second minibatch runs after an optimizer step
