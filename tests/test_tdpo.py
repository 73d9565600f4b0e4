"""TDPO and TDPO-R: the temporal critic's pieces against hand computations, neuron resets that touch exactly
the chosen neurons, the temporal update order, learning on the digits task, exact resume (critic, its optimizer
and the reset schedule included), and the headline command on tiny SD with a tiny CLIP."""


import pytest
import torch
from torch import nn

from helpers import read_metrics
from ddpo.core.critic import TemporalCriticHead, clipped_value_loss, explained_variance
from ddpo.core.neurons import dormant_masks, hidden_linears, neuron_scores, reset_neurons
from test_core import full_trajectory


def test_critic_head_has_the_papers_shape_and_init():
    head = TemporalCriticHead(768)
    linears = [layer for layer in head.mlp if isinstance(layer, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linears] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert [layer.p for layer in head.mlp if isinstance(layer, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert not any(isinstance(layer, (nn.ReLU, nn.GELU)) for layer in head.mlp)  # no activations
    assert all(float(layer.bias.detach().abs().max()) == 0 for layer in linears)
    assert abs(float(linears[0].weight.detach().std()) - 1 / 769) < 1e-4
    assert head(torch.randn(5, 768)).shape == (5,)


def test_clipped_value_loss_and_explained_variance_match_hand_computations():
    values, old, returns = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.5, 0.1, 0.5]), torch.tensor([0.0, 1.0, 0.6])
    # clip(V, V_old ± 0.2) = [0.7, 0.0, 0.5]; max((V−R)², (Vc−R)²) = [1.0, 1.0, 0.01]
    assert clipped_value_loss(values, old, returns, 0.2).item() == pytest.approx(0.5 * (1.0 + 1.0 + 0.01) / 3)
    returns64 = returns.double()
    expected = 1 - (returns64 - values.double()).var(unbiased=False) / returns64.var(unbiased=False)
    assert explained_variance(values, returns) == pytest.approx(float(expected))
    assert explained_variance(returns, returns) == 1.0


def test_neuron_scores_are_mean_relu_activity_over_the_layer_mean():
    mlp = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with torch.no_grad():
        mlp[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        mlp[0].bias.zero_()
    probe = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # hidden: [[1, 2, -3], [3, 0, -3]] -> |relu| means [2, 1, 0]
    (scores,) = neuron_scores(mlp, (probe,))
    assert scores.tolist() == pytest.approx([2 / (1 + 1e-9), 1 / (1 + 1e-9), 0.0])
    assert dormant_masks([scores], 0.0)[0].tolist() == [False, False, True]


def test_reset_changes_exactly_the_chosen_neurons_and_their_adam_moments():
    torch.manual_seed(0)
    head = TemporalCriticHead(8)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(2):  # some Adam state everywhere
        head(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    before = {name: tensor.clone() for name, tensor in head.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in head.parameters()}
    pairs = hidden_linears(head.mlp)
    masks = [torch.zeros(layer.out_features, dtype=torch.bool) for layer, _ in pairs]
    masks[1][[3, 70]] = True  # two neurons of the 128-wide layer
    assert reset_neurons(head.mlp, masks, optimizer, torch.Generator().manual_seed(1)) == 2

    layer, following = pairs[1]
    changed_rows, changed_columns = torch.zeros(128, dtype=torch.bool), torch.zeros(128, dtype=torch.bool)
    changed_rows[[3, 70]] = changed_columns[[3, 70]] = True
    for name, tensor in head.state_dict().items():
        old = before[name]
        if name.endswith("mlp.2.weight"):
            assert torch.equal(tensor[~changed_rows], old[~changed_rows]) and not torch.equal(tensor[changed_rows], old[changed_rows])
        elif name.endswith("mlp.2.bias"):
            assert torch.equal(tensor[~changed_rows], old[~changed_rows]) and (tensor[changed_rows] == 0).all()
        elif name.endswith("mlp.4.weight"):  # the next layer: only the outgoing columns
            assert torch.equal(tensor[:, ~changed_columns], old[:, ~changed_columns])
            assert not torch.equal(tensor[:, changed_columns], old[:, changed_columns])
        else:
            assert torch.equal(tensor, old), name
    for parameter in head.parameters():
        state = optimizer.state[parameter]
        assert torch.equal(state["step"], moments[id(parameter)]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            value, old = state[key], moments[id(parameter)][key]
            if parameter is layer.weight or parameter is layer.bias:
                assert (value[changed_rows] == 0).all() and torch.equal(value[~changed_rows], old[~changed_rows])
            elif parameter is following.weight:
                assert (value[:, changed_columns] == 0).all() and torch.equal(value[:, ~changed_columns], old[:, ~changed_columns])
            else:
                assert torch.equal(value, old)


def test_temporal_order_visits_every_minibatch_at_a_position_before_the_next_position():
    trajectory = full_trajectory(batch=8, steps=3)
    batches = list(trajectory.training_transitions(4, torch.Generator().manual_seed(0), steps_outer=True))
    assert len(batches) == 2 * 3
    default = list(trajectory.training_transitions(4, torch.Generator().manual_seed(0)))
    # the same transitions, positions outermost: batch (position p, minibatch m) = default (m, p)
    for position in range(3):
        for minibatch in range(2):
            assert torch.equal(batches[position * 2 + minibatch].sample, default[minibatch * 3 + position].sample)


TINY = ["--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
        "--set", "train.batch_size=4", "--set", "train.grad_accum=1"]


@pytest.mark.slow
def test_tdpo_r_learns_a_3_on_digits_and_its_critic_explains_the_reward(forked_cli, tmp_path):
    # digits defaults of tdpo-r (pixel features, KL 0.1). Seed 0: 0.14 0.08 0.16 0.15 0.14 0.29 0.30 0.27 0.36 0.57
    # 0.52 0.64, legibility 0.97-0.99, explained variance up to 0.19 before the reset at epoch 10.
    result = forked_cli.run("run", "--algo", "tdpo-r", "--set", "reward.target=3", "--set", "eval.rewards=[legibility]",
                            "--epochs", "12", "--logdir", str(tmp_path), "--run-name", "learn")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "learn")
    rewards = [record["reward/mean"] for record in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert min(record["eval/legibility/mean"] for record in records) > 0.85, records  # still digits
    assert max(record["critic/explained_variance"] for record in records) > 0.05, records


def test_headline_command_runs_on_tiny_sd_with_a_tiny_clip(tiny_sd, tiny_clip, aesthetic_weights, forked_cli, tmp_path):
    result = forked_cli.run("run", "--algo", "tdpo-r", "--reward", "aesthetic", "--model", "sd14",
                            "--set", f"model.pretrained={tiny_sd}", "--set", f"reward.clip_model={tiny_clip}",
                            "--set", f"reward.weights={aesthetic_weights}",
                            "--set", f"algorithm.clip_model={tiny_clip}",
                            "--set", "algorithm.reset_every=1", "--set", "eval.rewards=[compressibility]", *TINY,
                            "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "headline")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "headline")
    for tag in ("critic/loss", "critic/explained_variance", "critic/active_fraction", "critic/dormant_fraction",
                "critic/resets", "eval/compressibility/mean", "policy/ratio_dev_first"):
        assert tag in records[-1], tag
    assert records[-1]["critic/resets"] == 2.0 and records[0]["policy/ratio_dev_first"] <= 1e-6
