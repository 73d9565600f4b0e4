"""The embedded default: the shipped digits model and classifier, and RL fine-tuning on them."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from ddpo.core.config import resolve_config
from ddpo.core.rollout import sample_batch
from ddpo.plugins.models.digits import Digits, shipped_digits_path
from ddpo.plugins.rewards.digit_classifier import NOT_A_DIGIT, digit_probabilities, load_digit_classifier


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier("cpu")


def test_classifier_held_out_accuracy_is_at_least_97_percent(classifier):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # the same stratified 80/20 split, seed 0, as scripts/train_digits.py
    _, held_out = train_test_split(np.arange(len(digits.target)), test_size=0.2, stratify=digits.target,
                                   random_state=0)
    images = torch.tensor(digits.images[held_out], dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    predictions = digit_probabilities(classifier, images).argmax(dim=1)
    accuracy = (predictions == torch.tensor(digits.target[held_out])).float().mean().item()
    assert accuracy >= 0.97, accuracy


def test_shipped_model_draws_every_digit_legibly(classifier):
    model = Digits()
    model.load(torch.device("cpu"), torch.float32)
    config = resolve_config()  # the sampler of the embedded default
    images = []
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        _, batch = sample_batch(model, [""] * 64, [{}] * 64, num_steps=config.sample.num_steps,
                                eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
                                generator=generator)
        images.append(batch)
    probabilities = digit_probabilities(classifier, torch.cat(images))[:, :10]
    counts = torch.bincount(probabilities.argmax(dim=1), minlength=10)
    assert (counts > 0).all(), counts.tolist()
    assert probabilities.max(dim=1).values.mean() >= 0.6
    assert counts[0] / 256 < 0.25  # the default target starts far from solved


def test_blank_and_noise_images_do_not_score_as_a_digit(classifier):
    blank = torch.zeros(4, 3, 16, 16)
    grey = torch.full((4, 3, 16, 16), 0.4)
    noise = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    probabilities = digit_probabilities(classifier, torch.cat([blank, grey, noise]))
    assert probabilities[:, :10].max() < 0.2 and (probabilities[:, NOT_A_DIGIT] > 0.8).all(), probabilities


def short_default_run(cli, tmp_path, target: int, seed: int):
    """8 epochs of the embedded default (ddpo-is, digits model) towards `target` through `cli` (`run_cli` or
    `forked_cli.run`): the CLI result and each epoch's metrics. Asserts that the reward rose and the digits stayed
    legible."""
    result = cli("run", "--epochs", "8", "--seed", str(seed), "--set", f"reward.target={target}",
                     "--set", "eval.rewards=[legibility]", "--logdir", str(tmp_path), "--run-name", "demo")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward/mean"] for record in records]
    assert (rewards[-1] + rewards[-2]) / 2 > rewards[0] + 0.25 and rewards[-1] > 0.3, rewards
    assert min(record["eval/legibility/mean"] for record in records) > 0.85  # still clean digits
    return result


@pytest.mark.slow
def test_short_default_run_raises_the_target_probability(tmp_path):
    """A target other than 0, which the old recipe collapsed on (seed 0, one thread: 0.14 0.10 0.25 0.28 0.47
    0.49 0.56 0.54, legibility >= 0.97)."""
    result = short_default_run(run_cli, tmp_path, target=3, seed=0)
    assert "tensorboard --logdir" in result.stderr and "final samples:" in result.stderr

    checkpoint = tmp_path / "demo" / "checkpoints" / "epoch_0008"
    grid = tmp_path / "grid.png"
    sampled = run_cli("sample", "--model", "digits", "--checkpoint", str(checkpoint), "--num", "64",
                      "--out", str(grid))
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert grid.is_file()


@pytest.mark.slow
def test_short_default_run_learns_another_target_with_another_seed(forked_cli, tmp_path):
    """The recipe was tuned on targets 0, 3 and 7 with seed 0; target 6, seed 1 (one thread: 0.11 0.17 0.16 0.29
    0.37 0.28 0.38 0.56, legibility >= 0.97) is one of the bench's other 27 runs."""
    short_default_run(forked_cli.run, tmp_path, target=6, seed=1)


def test_ddpm_plugin_fine_tunes_a_pipeline_from_a_local_directory(tmp_path):
    """The `ddpm` model plugin (not `digits`) on a local DDPMPipeline directory, a copy of the shipped digits one:
    it loads through `from_pretrained` on the path, trains and checkpoints. Learning on this code path is what the
    default-run test shows (`digits` is this plugin with the shipped path); offline there is no other DDPM whose
    JPEG rewards move within a test's budget."""
    import shutil

    from safetensors.torch import load_file

    pipeline = shutil.copytree(shipped_digits_path(), tmp_path / "my-ddpm")
    result = run_cli("run", "--model", "ddpm", "--set", f"model.pretrained={pipeline}", "--algo", "ddpo-is",
                     "--reward", "digit", "--set", "sample.num_steps=4", "--set", "sample.batch_size=8",
                     "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=8", "--set", "train.grad_accum=1",
                     "--set", "train.learning_rate=1e-3", "--epochs", "1", "--logdir", str(tmp_path),
                     "--run-name", "ddpm")
    assert result.returncode == 0, result.stderr[-3000:]
    config = (tmp_path / "ddpm" / "config.yaml").read_text()
    assert "name: ddpm" in config and f"pretrained: {pipeline}" in config
    tuned = load_file(tmp_path / "ddpm" / "checkpoints" / "epoch_0001" / "weights.safetensors")
    base = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[key], base[key]) for key in base)  # the update moved the local weights
