"""Reward-hacking monitors, logged every epoch: the diversity of the epoch's samples and the drift of the fixed
evaluation images away from the base model's.

A policy that hacks its reward often collapses onto one image the reward likes (diversity falls towards 0) or
wanders far from what the pretrained model drew (drift grows while the reward climbs). Both are measured on
cheap features that need no download: each image (in [0, 1]) average-pooled to `FEATURE_SIZE` x `FEATURE_SIZE`
per channel, flattened. The distance of two images is the root mean square of their features' difference, in
[0, 1] whatever the resolution (a video's features are its frames', so its distance is over all of them).

- `monitor/diversity`: the mean distance over all pairs of the epoch's training samples (over all processes)
  that share a prompt; when no prompt repeats (every prompt differs), over all pairs of the batch. An
  unconditional model's samples all share the prompt "".
- `monitor/drift` (only with `eval.num_steps`, at every evaluation): the mean distance between each fixed
  evaluation image and the base model's image for the same prompt and initial noise. The base images are sampled
  once, before epoch 1 (the first evaluation follows epoch 1's update), with the pretrained weights, and their
  features are kept in `eval/base_features.safetensors`, so a resumed run measures drift from the same base as
  an uninterrupted one.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

FEATURE_SIZE = 16
"""Side of the pooled image the monitors compare: 3 x 16 x 16 = 768 features per RGB image."""
BASE_FEATURES_FILE = "base_features.safetensors"
"""In the run's eval/ directory: the base model's evaluation features (N, D), all processes' rows, process 0's
first, under the key "features"."""


def image_features(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, C * FEATURE_SIZE**2) float32 features on the CPU; videos (B, C, F, H, W)
    -> (B, C * F * FEATURE_SIZE**2), every frame pooled so."""
    images = images.detach().float().cpu()
    if images.ndim == 5:
        images = images.flatten(1, 2)
    return torch.nn.functional.adaptive_avg_pool2d(images, FEATURE_SIZE).flatten(1)


def distances(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) features -> (N, M) root-mean-square distances, in float64."""
    exact = torch.cdist(first.double(), second.double(), compute_mode="donot_use_mm_for_euclid_dist")
    return exact / math.sqrt(first.shape[1])


def diversity(features: torch.Tensor, prompts: list[str]) -> float | None:
    """Mean distance over the pairs of samples (N, D) that share a prompt, or over all pairs when no prompt
    repeats; None for fewer than two samples."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, prompt in enumerate(prompts):
        groups[prompt].append(index)
    members = [indices for indices in groups.values() if len(indices) > 1] or [list(range(len(prompts)))]
    pairwise = []
    for indices in members:
        if len(indices) < 2:
            continue
        block = distances(features[indices], features[indices])
        pairwise.append(block[torch.triu_indices(len(indices), len(indices), offset=1).unbind()])
    return float(torch.cat(pairwise).mean()) if pairwise else None


def gather_features(run, images: torch.Tensor) -> torch.Tensor:
    """This process's images -> the features (N, D) of every process's images, process 0's first (collective:
    every process calls it)."""
    accelerator = run.accelerator
    return accelerator.gather(image_features(images).to(accelerator.device)).cpu()


def epoch_diversity(run, images: torch.Tensor) -> dict[str, float]:
    """`monitor/diversity` of the epoch's images (this process's, matching `run.gathered_prompts` once
    gathered); {} when there are fewer than two samples."""
    features = gather_features(run, images)
    if len(features) != len(run.gathered_prompts):  # images that do not match the trajectories: nothing to say
        return {}
    value = diversity(features, run.gathered_prompts)
    return {} if value is None else {"monitor/diversity": value}


def drift(features: torch.Tensor, base: torch.Tensor | None) -> dict[str, float]:
    """`monitor/drift`: mean distance of evaluation features (N, D) to the base's (N, D), row by row; {}
    without a base of the same shape (a run resumed from before the monitors existed)."""
    if base is None or base.shape != features.shape:
        return {}
    return {"monitor/drift": float(distances(features, base).diagonal().mean())}


def base_features(run, directory: Path) -> torch.Tensor | None:
    """The base model's evaluation features (N, D): sampled now with the current (pretrained) weights and saved
    in `directory` before epoch 1, read back from there on a resumed run (collective at the start)."""
    from safetensors.torch import load_file, save_file

    from ddpo.core.engine.evaluation import evaluation_samples

    path = Path(directory) / BASE_FEATURES_FILE
    if run.epoch > 0:
        if path.exists():
            return load_file(str(path))["features"]
        if run.is_main:
            print(f"ddpo: {path} is missing: monitor/drift is not logged in this resumed run", file=sys.stderr)
        return None
    images, _, _ = evaluation_samples(run)
    features = gather_features(run, images)
    if run.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": features.contiguous()}, str(path))
    run.accelerator.wait_for_everyone()
    return features
