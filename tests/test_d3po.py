"""D3PO: the pairwise loss against a float64 hand computation, its update on real pairs of a tiny DDPM,
learning on the digits demo, a run on a tiny SD pipeline, and human labels: export, label, train, bad files."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from helpers import assert_learned, learning_cases, learning_run, read_metrics
from ddpo.cli import main
from ddpo.core.configuration.config import resolve_config
from ddpo.core.engine.rollout import sample_batch
from ddpo.core.engine.run import Run
from ddpo.plugins.algorithms.d3po import D3PO, net_preferences, preference_loss, preference_pairs
from ddpo.plugins.models.ddpm import PixelDDPM

BETA, EPS = 0.1, 0.1


def cli(*args):
    """`ddpo ARGS` in this process (the same entry point as the command); returns the exit code."""
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    return stopped.value.code


# -- the loss ----------------------------------------------------------------------------------------------

def hand_pairs(rewards, group_size=2, tie_margin=0.0):
    """Every pair (a, b), a < b, of each group of consecutive rows with its winner and loser, enumerated with
    itertools in float64: `(a, b, winner, loser)`, winner None for a tie (rewards less than tie_margin apart)."""
    pairs = []
    for start in range(0, len(rewards), group_size):
        for a, b in itertools.combinations(range(start, start + group_size), 2):
            gap = float(rewards[a]) - float(rewards[b])
            if gap == 0 or abs(gap) < tie_margin:
                pairs.append((a, b, None, None))
            else:
                pairs.append((a, b, a, b) if gap > 0 else (a, b, b, a))
    return pairs


def hand_loss(log_prob, ref_log_prob, rewards, group_size=2, tie_margin=0.0):
    """Float64 D3PO loss and margins, pair by pair, from the formula."""
    losses, margins = [], []
    for _, _, w, l in hand_pairs(rewards, group_size, tie_margin):
        if w is None:
            continue
        rho = [min(max(math.exp(log_prob[k] - ref_log_prob[k]), 1 - EPS), 1 + EPS) for k in (w, l)]
        losses.append(-math.log(1 / (1 + math.exp(-BETA * (math.log(rho[0]) - math.log(rho[1]))))))
        margins.append(BETA * ((log_prob[w] - ref_log_prob[w]) - (log_prob[l] - ref_log_prob[l])))
    return sum(losses) / max(len(losses), 1), margins


def pairs_of(rewards, group_size=2, tie_margin=0.0):
    return preference_pairs(torch.tensor(rewards), group_size, tie_margin)


def test_loss_and_margins_match_a_float64_hand_computation():
    log_prob = [0.05, -0.02, 0.3, 0.01, -0.04, -0.5, 0.08, 0.02]  # pairs 1 and 2 each have a member clamped
    ref_log_prob = [0.0, 0.01, -0.01, 0.0, 0.02, 0.03, 0.0, 0.0]
    rewards = [0.2, 0.7, 0.9, 0.1, 0.5, 0.4, 0.3, 0.3]  # pair 3 is a tie
    loss, margin, valid, clamped = preference_loss(torch.tensor(log_prob), torch.tensor(ref_log_prob),
                                                   pairs_of(rewards), BETA, EPS)
    expected_loss, expected_margins = hand_loss(log_prob, ref_log_prob, rewards)
    assert valid.tolist() == [True, True, True, False]
    assert clamped.tolist() == [False, False, True, False, False, True, False, False]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert margin[valid].tolist() == pytest.approx(expected_margins, rel=1e-5)
    assert net_preferences(torch.tensor(rewards)).tolist() == [-1, 1, 1, -1, 1, -1, 0, 0]


def test_groups_train_every_pair_as_a_hand_enumeration_does():
    # Two groups of 4 (the official human-feedback pipeline trains all pairs of its groups of 7), with a tie (rows
    # 1, 2) and two pairs closer than the tie margin 0.05 (rows 4, 6 and 5, 7).
    rewards = [0.2, 0.7, 0.7, 0.1, 0.5, 0.43, 0.52, 0.4]
    log_prob = [0.05, -0.02, 0.3, 0.01, -0.04, -0.5, 0.08, 0.02]
    ref_log_prob = [0.0, 0.01, -0.01, 0.0, 0.02, 0.03, 0.0, 0.0]
    for tie_margin in (0.0, 0.05):
        expected = hand_pairs(rewards, 4, tie_margin)
        first, second, direction = pairs_of(rewards, 4, tie_margin)
        assert len(expected) == 2 * 6
        assert list(zip(first.tolist(), second.tolist())) == [(a, b) for a, b, _, _ in expected]
        assert direction.tolist() == [0 if w is None else 1 if w == a else -1 for a, _, w, _ in expected]

        net = [0] * len(rewards)
        for _, _, w, l in expected:
            if w is not None:
                net[w] += 1
                net[l] -= 1
        assert net_preferences(torch.tensor(rewards), 4, tie_margin).tolist() == net

        loss, margin, valid, _ = preference_loss(torch.tensor(log_prob), torch.tensor(ref_log_prob),
                                                 (first, second, direction), BETA, EPS)
        expected_loss, expected_margins = hand_loss(log_prob, ref_log_prob, rewards, 4, tie_margin)
        assert int(valid.sum()) == len(expected_margins) == sum(w is not None for *_, w, _ in expected)
        assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
        assert margin[valid].tolist() == pytest.approx(expected_margins, rel=1e-5)
    assert net == [-1, 2, 2, -3, 2, -2, 2, -2]  # with the margin, 4 and 6 tie, and 5 and 7


def test_a_tied_pair_adds_no_loss_and_no_gradient():
    log_prob = torch.tensor([0.03, -0.02, 0.05, 0.01], requires_grad=True)
    loss, _, valid, _ = preference_loss(log_prob, torch.zeros(4), pairs_of([1.0, 0.0, 0.5, 0.5]), BETA, EPS)
    loss.backward()
    alone, _ = hand_loss([0.03, -0.02], [0.0, 0.0], [1.0, 0.0])
    assert loss.item() == pytest.approx(alone, rel=1e-6)  # the mean is over the one valid pair
    assert log_prob.grad[2:].tolist() == [0.0, 0.0] and (log_prob.grad[:2] != 0).all()

    all_tied = torch.tensor([0.03, -0.02], requires_grad=True)
    loss, _, valid, _ = preference_loss(all_tied, torch.zeros(2), pairs_of([0.5, 0.5]), BETA, EPS)
    loss.backward()  # still a differentiable zero: the micro-step happens
    assert loss.item() == 0.0 and all_tied.grad.tolist() == [0.0, 0.0] and not valid.any()


def test_the_clamp_stops_the_gradient_of_a_ratio_outside_one_plus_minus_eps():
    # Member 0's ratio exp(0.2) > 1.1 is clamped; member 1's exp(-0.05) is inside. Then a ratio that would
    # overflow exp() in float32 (log-ratio 200, possible at low-noise steps): still finite, no gradient.
    log_prob = torch.tensor([0.2, -0.05, 200.0, 0.0], requires_grad=True)
    loss, _, _, clamped = preference_loss(log_prob, torch.zeros(4), pairs_of([1.0, 0.0, 1.0, 0.0]), BETA, EPS)
    loss.backward()
    grad = log_prob.grad.tolist()
    assert grad[0] == 0.0 and grad[2] == 0.0
    softplus = [math.log1p(math.exp(-BETA * (math.log(1 + EPS) - loser))) for loser in (-0.05, 0.0)]
    assert loss.item() == pytest.approx(sum(softplus) / 2, rel=1e-6)  # both winners at log(1 + eps)
    assert clamped.tolist() == [True, False, True, False]

    def loser_gradient(clamped_winner, loser):  # d/d(log p_l) of -log sigmoid(beta (w - l)), halved by the mean
        return BETA * (1 - 1 / (1 + math.exp(-BETA * (clamped_winner - loser)))) / 2

    assert grad[1] == pytest.approx(loser_gradient(math.log(1 + EPS), -0.05), rel=1e-5)
    assert grad[3] == pytest.approx(loser_gradient(math.log(1 + EPS), 0.0), rel=1e-5)


# -- the update on real pairs ------------------------------------------------------------------------------

def make_pairs_run(tiny_ddpm, tmp_path, learning_rate, inner_epochs=1, options=None):
    """A Run of d3po around the tiny DDPM (trained in full, with its frozen reference) and 4 sampled pairs."""
    model = PixelDDPM({"pretrained": str(tiny_ddpm)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    config = resolve_config(None, ["sample.num_steps=6", "sample.batch_size=8", "sample.batches_per_epoch=1",
                                   f"train.learning_rate={learning_rate}", "train.batch_size=2", "train.grad_accum=1",
                                   f"train.inner_epochs={inner_epochs}"],
                            {"model": {"name": "ddpm"}, "algorithm": {"name": "d3po"}})
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.train.learning_rate)
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    model.prepare_reference()
    algorithm = D3PO(options)
    run = Run(config=config, accelerator=accelerator, model=model, reward=None, algorithm=algorithm,
              prompt_set=None, run_dir=tmp_path, optimizer=optimizer, stat_tracker=None, epoch=1)
    return run


def sample_pairs(run, rewards):
    trajectory, _ = sample_batch(run.model, [""] * 8, [{}] * 8, num_steps=6, eta=1.0, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(0), group_size=2)
    trajectory.rewards = torch.tensor(rewards)
    trajectory.advantages = run.algorithm.compute_advantages(run, trajectory)
    return trajectory


def log_ratios_of(model, trajectory):
    """(B, T) float64 log p_theta - log p_ref of the trajectory's steps."""
    columns = []
    with torch.no_grad():
        for step in range(trajectory.num_steps):
            transitions = trajectory.transitions(torch.full((trajectory.batch_size,), step))
            log_prob, *_ = model.step_log_prob(transitions, 1.0, 1.0)
            with model.reference():
                ref_log_prob, *_ = model.step_log_prob(transitions, 1.0, 1.0)
            columns.append((log_prob - ref_log_prob).double())
    return torch.stack(columns, dim=1)


def test_at_initialisation_the_policy_is_the_reference_and_the_loss_is_log_2(tiny_ddpm, tmp_path):
    run = make_pairs_run(tiny_ddpm, tmp_path, learning_rate=1e-4)
    trajectory = sample_pairs(run, [1.0, 0.0, 0.0, 1.0, 0.3, 0.2, 0.6, 0.9])
    assert torch.equal(trajectory.group_ids[0::2], trajectory.group_ids[1::2])
    assert torch.equal(trajectory.latents[0::2, 0], trajectory.latents[1::2, 0])  # same initial noise
    assert (log_ratios_of(run.model, trajectory)[trajectory.policy_steps] == 0).all()
    transitions = trajectory.transitions(torch.zeros(8, dtype=torch.long))
    log_prob, *_ = run.model.step_log_prob(transitions, 1.0, 1.0)
    with torch.no_grad(), run.model.reference():
        ref_log_prob, *_ = run.model.step_log_prob(transitions, 1.0, 1.0)
    loss, margin, _, _ = preference_loss(log_prob, ref_log_prob, preference_pairs(trajectory.rewards), BETA, EPS)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7) and (margin == 0).all()

    metrics = run.algorithm.update(run, trajectory)
    assert metrics["policy/ratio_dev_first"] < 1e-5  # recomputed log-probs match the sampled ones (batch 2 vs 8)
    assert metrics["train/optimizer_steps"] == 4  # one per pair: train.batch_size 2, grad_accum 1
    assert metrics["d3po/pairs"] == 4
    after = log_ratios_of(run.model, trajectory)
    assert (after[trajectory.policy_steps] != 0).any()  # the policy moved away from the reference


def test_the_reference_runs_once_per_pair_step_across_inner_epochs(tiny_ddpm, tmp_path):
    """D3PO reads the pretrained model's log-prob at every micro-step; with two inner epochs it is computed on the
    first visit of each (trajectory, step) only (policy_update's cache), and the second epoch still trains."""
    run = make_pairs_run(tiny_ddpm, tmp_path, learning_rate=1e-4, inner_epochs=2)
    trajectory = sample_pairs(run, [1.0, 0.0, 0.0, 1.0, 0.3, 0.2, 0.6, 0.9])
    passes, original = [], run.model.reference

    def counted():
        passes.append(1)
        return original()

    run.model.reference = counted
    metrics = run.algorithm.update(run, trajectory)
    policy_steps = int(trajectory.policy_steps[0].sum())
    assert len(passes) == 4 * policy_steps  # 4 minibatches (one pair each) x the steps, in the first inner epoch
    assert metrics["train/optimizer_steps"] == 8  # one per pair and inner epoch


def test_kl_weight_adds_the_kl_to_the_pretrained_model_to_the_preference_loss(tiny_ddpm, tmp_path):
    """Without kl_weight (the paper's loss) no KL is computed; with it, loss/total = loss/policy + kl_weight x loss/kl
    (epoch means over the same transitions), and the KL is positive once the policy has moved."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.3, 0.2, 0.6, 0.9]
    run = make_pairs_run(tiny_ddpm, tmp_path, learning_rate=1e-3)
    metrics = run.algorithm.update(run, sample_pairs(run, rewards))
    assert "loss/kl" not in metrics and metrics["loss/total"] == metrics["loss/policy"]

    run = make_pairs_run(tiny_ddpm, tmp_path, learning_rate=1e-3, options={"kl_weight": 0.5})
    metrics = run.algorithm.update(run, sample_pairs(run, rewards))
    assert metrics["loss/kl"] > 0
    assert metrics["loss/total"] == pytest.approx(metrics["loss/policy"] + 0.5 * metrics["loss/kl"], rel=1e-6)


def test_preference_accuracy_counts_the_pairs_the_policy_already_prefers(tiny_ddpm, tmp_path):
    # A policy moved away from the reference; a learning rate too small to change float32 weights, so the
    # accuracy the update logs is that of the starting policy, counted here by hand in float64.
    run = make_pairs_run(tiny_ddpm, tmp_path, learning_rate=1e-20)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for parameter in run.model.trainable_parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    rewards = [1.0, 0.0, 0.2, 0.8, 0.5, 0.5, 0.7, 0.1]  # pair 2 is a tie
    trajectory = sample_pairs(run, rewards)
    log_ratios = log_ratios_of(run.model, trajectory)
    policy = trajectory.policy_steps[0]
    margins = [BETA * direction * (log_ratios[2 * j, policy] - log_ratios[2 * j + 1, policy])
               for j, direction in [(0, 1), (1, -1), (3, 1)]]
    expected = float(torch.cat(margins).gt(0).double().mean())
    assert 0 < expected < 1  # the check can tell counting right from counting wrong

    metrics = run.algorithm.update(run, trajectory)
    assert metrics["d3po/preference_accuracy"] == pytest.approx(expected)
    assert metrics["d3po/margin"] == pytest.approx(float(torch.cat(margins).mean()), rel=1e-4)
    assert metrics["d3po/pairs"] == 3


# -- runs through the command line ---------------------------------------------------------------------------

D3PO_TAGS = ["d3po/preference_accuracy", "d3po/pairs", "d3po/margin", "d3po/clamped_fraction", "loss/policy",
             "loss/total", "policy/ratio_dev_first", "policy/approx_kl", "train/optimizer_steps"]


def test_d3po_runs_on_a_tiny_sd_pipeline(tiny_sd, tmp_path):
    """Two pairs, one optimizer step per epoch (tied pairs count). The first epoch runs entirely at the pretrained
    weights (LoRA's B is 0 until the first step), so every judged pair is at ratio 1 to the reference: loss log 2,
    margin 0, no preference, no clamp. The second runs after the step, away from the reference."""
    code = cli("run", "--algo", "d3po", "--reward", "compressibility", "--model", "sd14",
               "--set", f"model.pretrained={tiny_sd}", "--set", "sample.num_steps=2", "--set", "sample.batch_size=4",
               "--set", "sample.batches_per_epoch=1", "--set", "train.grad_accum=2", "--epochs", "2",
               "--logdir", str(tmp_path), "--run-name", "sd")
    assert code == 0
    records = read_metrics(tmp_path / "sd")
    assert len(records) == 2
    for record in records:
        assert set(D3PO_TAGS) <= record.keys(), record
        assert record["d3po/pairs"] in (1, 2)  # compressibility can tie on this tiny model
        assert record["train/optimizer_steps"] == 1  # 2 pairs, tied or not, x grad_accum 2
        assert record["loss/total"] == record["loss/policy"]
        assert record["policy/ratio_dev_first"] < 1e-5  # batch 2 recomputes batch 4's log-probs: equal up to rounding
    first, second = records
    # The epoch mean over both pairs' micro-steps: log 2 for a judged pair, 0 for a tied one.
    assert first["loss/policy"] == pytest.approx(math.log(2) * first["d3po/pairs"] / 2, rel=1e-6)
    assert first["d3po/margin"] == 0 and first["d3po/preference_accuracy"] == 0
    assert first["d3po/clamped_fraction"] == 0
    assert second["d3po/margin"] != 0
    # Each epoch trains at its own sampling policy until its one step: the ratio to it is 1 throughout.
    assert all(record["policy/approx_kl"] < 1e-10 and record["policy/ratio_mean"] == pytest.approx(1, abs=1e-6)
               for record in records)


D3PO_THRESHOLD, D3PO_EPOCHS = 0.01, 8


@pytest.mark.slow
@pytest.mark.parametrize("target, seed, shuffled", learning_cases([(3, 0), (7, 1), (8, 1)], control=(8, 0)))
def test_d3po_learns_digits_targets_from_reward_labelled_pairs_not_from_shuffled_ones(forked_cli, tmp_path, target,
                                                                                     seed, shuffled):
    """d3po's digits recipe (`model_run_defaults`: 4 pairs a minibatch, the first 18 of 20 steps trained, KL
    weight 0.01 to the pretrained model), 8 epochs. `reward_rise` on targets 3 / 7 / 8 x seeds 0, 1, 2: 0.25 0.17
    0.20 / 0.15 0.52 0.26 / 0.18 0.37 0.34 (Intel Xeon, benchmarks/bench_learning_tests.py), std 0.113.
    The recipe's values were chosen on (8, 2), and (3, 0) served to reject the KL term alone; (7, 1) and (8, 1)
    were first run with the recipe fixed. The pairs asserted rose 0.25, 0.52 and 0.37: at least 0.242 over the
    0.01 threshold, more than 2 x 0.113 (the threshold is low because the spread is wide: the lowest rise, (7, 0),
    is 0.15, and a run's epoch mean moves by up to 0.46 from one epoch to the next). The controls with shuffled
    rewards: (8, 0) -0.11, (3, 0) -0.00. The lowest legibility of a learning run was 0.89, on (8, 2), and 0.91 on
    the pairs asserted (under the previous recipe seed 2 lost its digits: legibility 0.04-0.43). 37-39 CPU seconds
    a run."""
    records = learning_run(forked_cli, tmp_path, "d3po", target, seed, D3PO_EPOCHS, shuffled=shuffled)
    assert_learned(records, shuffled, D3PO_THRESHOLD, min_legibility=0.9)


@pytest.fixture(scope="module")
def labelled_pairs(tmp_path_factory):
    """16 digit pairs exported for labelling, labelled by a scripted person who prefers the brighter image."""
    directory = tmp_path_factory.mktemp("pairs")
    assert cli("pairs", "export", "--out", str(directory), "--num", "16", "--seed", "1") == 0
    labels = []
    for line in (directory / "pairs.jsonl").read_text().splitlines():
        entry = json.loads(line)
        picture = np.asarray(Image.open(directory / entry["image"]), dtype=np.float64)
        half = picture.shape[1] // 2
        left, right = picture[:, :half].mean(), picture[:, half:].mean()
        labels.append({"pair": entry["pair"], "preferred": 0 if left > right else 1})
    (directory / "labels.jsonl").write_text("".join(json.dumps(label) + "\n" for label in labels))
    return directory


def test_export_holds_what_a_labeller_and_the_trainer_need(labelled_pairs):
    from safetensors.torch import load_file

    export = json.loads((labelled_pairs / "export.json").read_text())
    assert export["model"]["name"] == "digits" and export["sample"] == {"num_steps": 20, "eta": 1.0,
                                                                       "guidance_scale": 1.0}
    tensors = load_file(str(labelled_pairs / "trajectories.safetensors"))
    assert tensors["latents"].shape == (32, 21, 3, 16, 16)
    assert tensors["group_ids"].tolist() == [pair for pair in range(16) for _ in (0, 1)]
    assert torch.equal(tensors["latents"][0::2, 0], tensors["latents"][1::2, 0])  # a pair shares x_T
    assert not torch.equal(tensors["latents"][0::2, -1], tensors["latents"][1::2, -1])
    with Image.open(labelled_pairs / "pair_0003.png") as picture:
        assert picture.width >= 2 * 256 and picture.height >= 256
    assert '"preferred": "tie"' in (labelled_pairs / "README.txt").read_text()


def test_training_on_human_labels_learns_the_labelled_preference(labelled_pairs, tmp_path):
    code = cli("run", "--algo", "d3po", "--set", f"algorithm.labels={labelled_pairs / 'labels.jsonl'}",
               "--set", "train.batch_size=8", "--epochs", "8", "--logdir", str(tmp_path), "--run-name", "human")
    assert code == 0
    records = read_metrics(tmp_path / "human")
    accuracy = [record["d3po/preference_accuracy"] for record in records]
    margin = [record["d3po/margin"] for record in records]
    assert all(record["d3po/pairs"] == 16 and record["reward_queries"] == 32 * record["epoch"] for record in records)
    assert accuracy[-1] > max(0.75, accuracy[0] + 0.3), accuracy  # measured: 0.40 -> 0.87
    assert margin[-1] > 0 and margin[-1] > margin[0], margin


def test_pairs_of_a_model_with_several_embeddings_export_and_train(tiny_sd3, tmp_path):
    """SD3 conditions on a dict of embeddings (per-token and pooled): the export stores each as its own tensor and
    training on the labels rebuilds the dict (both once failed: the export could not save a dict)."""
    from safetensors.torch import load_file

    sets = ["--model", "sd3", "--set", f"model.pretrained={tiny_sd3}", "--set", "model.lora_rank=4",
            "--set", "sample.num_steps=2"]
    assert cli("pairs", "export", "--out", str(tmp_path / "pairs"), "--num", "2", *sets) == 0
    tensors = load_file(str(tmp_path / "pairs" / "trajectories.safetensors"))
    assert tensors["prompt_embeds.prompt_embeds"].shape[0] == 4
    assert tensors["prompt_embeds.pooled_prompt_embeds"].shape[0] == 4
    labels = tmp_path / "pairs" / "labels.jsonl"
    labels.write_text('{"pair": 0, "preferred": 0}\n{"pair": 1, "preferred": 1}\n')
    assert cli("run", "--algo", "d3po", *sets, "--set", f"algorithm.labels={labels}", "--set", "train.batch_size=2",
               "--set", "train.grad_accum=1", "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "sd3") == 0
    [record] = read_metrics(tmp_path / "sd3")
    assert record["d3po/pairs"] == 2 and record["train/optimizer_steps"] == 2


@pytest.mark.parametrize("labels, fragment", [
    ("missing.jsonl", "labels file not found"),
    ('{"pair": 0, "preferred": 0}\nnot json\n', "line 2 is not JSON"),
    ('{"pair": 99, "preferred": 1}\n', "unknown pair id 99"),
    ('{"pair": 3, "preferred": "left"}\n', '"preferred" must be 0 (left), 1 (right) or "tie"'),
    ('{"pair": 3, "preferred": true}\n', '"preferred" must be 0 (left), 1 (right) or "tie"'),
    ('{"pair": 3}\n', 'must be an object with "pair" and "preferred"'),
])
def test_bad_labels_stop_the_run_before_it_writes_anything(labels, fragment, labelled_pairs, tmp_path, capsys):
    path = labelled_pairs / ("missing.jsonl" if labels == "missing.jsonl" else f"bad_{tmp_path.name}.jsonl")
    if labels != "missing.jsonl":
        path.write_text(labels)
    assert_refused(["--set", f"algorithm.labels={path}"], fragment, tmp_path, capsys)


def assert_refused(args, fragment, tmp_path, capsys):
    capsys.readouterr()
    code = cli("run", "--algo", "d3po", *args, "--logdir", str(tmp_path / "runs"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddpo: error: "), lines
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_labels_without_an_export_are_refused(tmp_path, capsys):
    (tmp_path / "labels.jsonl").write_text('{"pair": 0, "preferred": 0}\n')
    assert_refused(["--set", f"algorithm.labels={tmp_path / 'labels.jsonl'}"], "no pair export in", tmp_path, capsys)


@pytest.mark.parametrize("mismatch, fragment", [
    (["--set", "sample.num_steps=10"], "sampled with sample.num_steps=20, but this run has sample.num_steps=10"),
    (["--model", "ddpm"], "sampled with model=digits, but this run has model=ddpm"),
])
def test_an_export_from_other_settings_is_refused(mismatch, fragment, labelled_pairs, tiny_ddpm, tmp_path, capsys):
    if "ddpm" in mismatch:
        mismatch = [*mismatch, "--set", f"model.pretrained={tiny_ddpm}"]
    assert_refused([*mismatch, "--set", f"algorithm.labels={labelled_pairs / 'labels.jsonl'}"], fragment, tmp_path,
                   capsys)


def test_an_out_of_range_option_is_refused(tmp_path, capsys):
    assert_refused(["--set", "algorithm.eps=1.5"], "algorithm.eps", tmp_path, capsys)
