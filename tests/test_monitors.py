"""Reward-hacking monitors (issue 24): `monitor/diversity` of each epoch's samples and `monitor/drift` of the fixed
evaluation images from the base model's, on real runs of the embedded digits model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from safetensors.torch import load_file

from ddpo.core.configuration.config import resolve_config
from ddpo.core.engine.monitors import BASE_FEATURES_FILE, FEATURE_SIZE, diversity, drift, image_features

from helpers import read_metrics

TINY = ["reward.target=3", "sample.batch_size=8", "sample.batches_per_epoch=1", "sample.num_steps=4",
        "train.batch_size=8", "eval.num_steps=3"]


def by_hand(image: torch.Tensor) -> list[float]:
    """An image's features in float64 with loops: the mean of each block of pixels, channel by channel."""
    channels, height, width = image.shape
    rows, cols = height // FEATURE_SIZE, width // FEATURE_SIZE
    return [sum(float(image[c, i * rows + a, j * cols + b]) for a in range(rows) for b in range(cols)) / (rows * cols)
            for c in range(channels) for i in range(FEATURE_SIZE) for j in range(FEATURE_SIZE)]


def rms(first: list[float], second: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(first, second, strict=True)) / len(first))


def test_diversity_is_zero_for_identical_images_and_the_hand_computation_for_known_ones():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 32, 32, generator=generator)
    assert diversity(image_features(image.expand(6, -1, -1, -1)), [""] * 6) == 0.0

    images = torch.rand(5, 3, 32, 32, generator=generator)
    features = [by_hand(image) for image in images]
    prompts = ["cat", "dog", "cat", "dog", "fish"]  # pairs within "cat" and "dog"; the lone "fish" has none
    expected = (rms(features[0], features[2]) + rms(features[1], features[3])) / 2
    assert diversity(image_features(images), prompts) == pytest.approx(expected, rel=1e-6, abs=0)
    every_pair = [rms(features[i], features[j]) for i, j in itertools.combinations(range(5), 2)]
    assert abs(expected - sum(every_pair) / 10) > 1e-3  # pairing across prompts would be visibly wrong
    assert diversity(image_features(images), list("abcde")) == pytest.approx(sum(every_pair) / 10, rel=1e-6)
    assert diversity(image_features(images[:1]), ["a"]) is None

    # drift pairs each image with the base's image of the same row, not with any other
    assert drift(image_features(images), image_features(images)) == {"monitor/drift": 0.0}
    shifted = drift(image_features(images), image_features(images.roll(1, 0)))["monitor/drift"]
    assert shifted == pytest.approx(sum(rms(features[i], features[i - 1]) for i in range(5)) / 5, rel=1e-6)


def test_drift_is_zero_without_an_update_and_grows_with_a_large_learning_rate(tmp_path):
    from ddpo.core.engine.trainer import train

    flags = {"reward": {"name": "digit"}, "logdir": str(tmp_path), "device": "cpu"}
    # a learning rate far below float32's resolution of the weights: the update leaves them as they were
    still = train(resolve_config(None, [*TINY, "train.learning_rate=1e-30"], {**flags, "epochs": 1,
                                                                              "run_name": "still"}))
    moved = train(resolve_config(None, [*TINY, "train.learning_rate=3e-2"], {**flags, "epochs": 2,
                                                                             "run_name": "moved"}))
    [record] = read_metrics(still)
    assert record["monitor/drift"] == 0.0
    first, second = read_metrics(moved)
    assert first["monitor/drift"] > 0.05 and second["monitor/drift"] > 0.05  # distances are in [0, 1]
    # both start from the same samples: epoch 1's diversity is measured before its update
    assert first["monitor/diversity"] == record["monitor/diversity"] > 0.05
    base = load_file(str(moved / "eval" / BASE_FEATURES_FILE))["features"]
    assert torch.equal(base, load_file(str(still / "eval" / BASE_FEATURES_FILE))["features"])
    assert base.shape == (8, 3 * FEATURE_SIZE ** 2)


def test_drift_after_resume_equals_the_uninterrupted_runs(tmp_path, monkeypatch):
    """A run that fails at epoch 2 (after logging it, before its checkpoint) and is resumed measures the same
    drift as one that ran straight: the base comes from eval/base_features.safetensors, not the resumed weights."""
    from ddpo.core.engine import trainer

    sets = [*TINY, "train.learning_rate=3e-2", "save_every=1", "keep_checkpoints=0"]
    flags = {"reward": {"name": "digit"}, "logdir": str(tmp_path), "device": "cpu", "epochs": 3}
    straight = trainer.train(resolve_config(None, sets, {**flags, "run_name": "straight"}))
    config = resolve_config(None, sets, {**flags, "run_name": "failed"})

    report = trainer.report_epoch

    def fail_at_epoch_2(record, epochs):
        if record["epoch"] == 2:
            raise RuntimeError("failed at epoch 2")
        report(record, epochs)

    monkeypatch.setattr(trainer, "report_epoch", fail_at_epoch_2)
    with pytest.raises(RuntimeError, match="failed at epoch 2"):
        trainer.train(config)
    failed = tmp_path / "failed"
    assert len(read_metrics(failed)) == 2 and (failed / "eval" / BASE_FEATURES_FILE).exists()
    monkeypatch.setattr(trainer, "report_epoch", report)
    trainer.train(config, resume_dir=failed)

    resumed = read_metrics(failed)
    assert [record["epoch"] for record in resumed] == [1, 2, 3]
    assert [record["monitor/drift"] for record in resumed] == [record["monitor/drift"]
                                                                for record in read_metrics(straight)]
    assert [record["monitor/diversity"] for record in resumed] == [record["monitor/diversity"]
                                                                    for record in read_metrics(straight)]
