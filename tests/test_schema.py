"""The Trajectory dataclass: shape validation, batching, and per-sample timestep shuffling."""

import pytest
import torch

from ddpo.core.plugin_api.schema import Trajectory


def make_trajectory(batch=4, steps=5, policy_steps=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    if policy_steps is not None:
        mask[:, policy_steps:] = False
    return Trajectory(
        latents=torch.randn(batch, steps + 1, 3, 4, 4, generator=generator),
        timesteps=torch.arange(steps * 100, 0, -100).repeat(batch, 1),
        log_probs=torch.randn(batch, steps, generator=generator) * mask,
        policy_steps=mask,
        prompts=[f"prompt {index}" for index in range(batch)],
        prompt_metadata=[{"index": index} for index in range(batch)],
        prompt_embeds=torch.randn(batch, 7, 8, generator=generator),
        rewards=torch.arange(batch, dtype=torch.float32),
    )


def test_shape_errors_name_the_field_and_both_shapes():
    trajectory = make_trajectory()
    with pytest.raises(ValueError, match=r"Trajectory.log_probs has shape \(4, 4\), expected \(4, 5\)"):
        Trajectory(**{**trajectory.__dict__, "log_probs": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"Trajectory.rewards has shape \(3,\), expected \(4,\)"):
        Trajectory(**{**trajectory.__dict__, "rewards": torch.zeros(3)})
    with pytest.raises(ValueError, match="prompts has 2 entries, expected 4"):
        Trajectory(**{**trajectory.__dict__, "prompts": ["a", "b"]})
    with pytest.raises(ValueError, match=r"extras\['critic'\] has shape \(2,\)"):
        Trajectory(**{**trajectory.__dict__, "extras": {"critic": torch.zeros(2)}})
    Trajectory(**{**trajectory.__dict__, "advantages": torch.zeros(4, 5), "values": torch.zeros(4, 5)})


def test_index_cat_and_minibatches_keep_samples_together():
    trajectory = make_trajectory(batch=6)
    picked = trajectory[torch.tensor([4, 1])]
    assert picked.prompts == ["prompt 4", "prompt 1"] and picked.prompt_metadata[0] == {"index": 4}
    assert torch.equal(picked.latents[1], trajectory.latents[1]) and picked.rewards.tolist() == [4.0, 1.0]
    joined = Trajectory.cat([trajectory[0:2], trajectory[2:6]])
    assert torch.equal(joined.latents, trajectory.latents) and joined.prompts == trajectory.prompts
    parts = trajectory.minibatches(4, generator=torch.Generator().manual_seed(0))
    assert [part.batch_size for part in parts] == [4, 2]
    assert sorted(prompt for part in parts for prompt in part.prompts) == sorted(trajectory.prompts)
    with pytest.raises(ValueError, match="only some have 'rewards'"):
        Trajectory.cat([trajectory[0:2], Trajectory(**{**trajectory[2:4].__dict__, "rewards": None})])


def test_to_moves_every_tensor():
    moved = make_trajectory().to("meta")
    assert moved.latents.device.type == "meta" and moved.prompt_embeds.device.type == "meta"


def test_shuffled_steps_are_per_sample_permutations_of_policy_steps_only():
    trajectory = make_trajectory(batch=8, steps=10, policy_steps=9)
    order = trajectory.shuffled_steps(torch.Generator().manual_seed(0))
    assert order.shape == (8, 9)
    for row in order:
        assert sorted(row.tolist()) == list(range(9))  # step 9 is deterministic: never trained on
    assert len({tuple(row.tolist()) for row in order}) > 1  # each sample has its own order
    half = trajectory.shuffled_steps(torch.Generator().manual_seed(0), fraction=0.5)
    assert half.shape == (8, 4) and int(half.max()) < 9


def test_transitions_pick_each_samples_own_step():
    trajectory = make_trajectory(batch=3, steps=5)
    trajectory.advantages = torch.tensor([1.0, 2.0, 3.0])
    steps = torch.tensor([0, 4, 2])
    transitions = trajectory.transitions(steps)
    for row, step in enumerate(steps.tolist()):
        assert torch.equal(transitions.sample[row], trajectory.latents[row, step])
        assert torch.equal(transitions.next_sample[row], trajectory.latents[row, step + 1])
        assert transitions.timesteps[row] == trajectory.timesteps[row, step]
        assert transitions.log_probs[row] == trajectory.log_probs[row, step]
    assert transitions.advantages.tolist() == [1.0, 2.0, 3.0]


def test_training_transitions_visit_every_sample_at_every_trained_step_once():
    trajectory = make_trajectory(batch=8, steps=6)
    seen = []
    for transitions in trajectory.training_transitions(4, torch.Generator().manual_seed(1)):
        assert transitions.sample.shape[0] == 4
        for row in range(4):
            seen.append((float(transitions.sample[row].sum()), int(transitions.timesteps[row])))
    expected = {(float(trajectory.latents[b, s].sum()), int(trajectory.timesteps[b, s]))
                for b in range(8) for s in range(6)}
    assert len(seen) == 48 and set(seen) == expected


def test_first_selection_trains_the_first_steps_in_order_as_flow_grpo():
    """Flow-GRPO (scripts/train_sd3.py:345, 864): num_train_timesteps = int(num_steps x timestep_fraction) and each
    minibatch trains steps 0, 1, ..., that number - 1 in order: with 10 steps and 0.99, steps 0-8, never step 9."""
    trajectory = make_trajectory(batch=8, steps=10)
    trained = int(10 * 0.99)
    order = trajectory.shuffled_steps(torch.Generator().manual_seed(0), fraction=0.99, selection="first")
    assert order.tolist() == [list(range(trained))] * 8
    visits = []
    for transitions in trajectory.training_transitions(4, torch.Generator().manual_seed(1), fraction=0.99,
                                                       selection="first"):
        assert len(set(transitions.steps.tolist())) == 1  # one step position for the whole minibatch
        visits.append(int(transitions.steps[0]))
    assert visits == list(range(trained)) * 2  # two minibatches, each through steps 0..8 in order
