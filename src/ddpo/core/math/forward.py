"""The forward process on final samples, for the methods that train on sampled images re-noised rather than on the
sampled chain (DiffusionNFT): which times of the sampling schedule each sample is re-noised at.

The noising itself, and what the model should predict there, is the sampler's (`Sampler.noised`), and the clean
state a model output implies is `Sampler.predicted_original`.
"""

from __future__ import annotations

import torch


def renoising_steps(batch_size: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(B, K) int64 indices into each sample's sampling schedule (its `Trajectory.timesteps` row), K =
    max(1, int(num_steps x fraction)): each sample's own random K of the `num_steps` steps, in random order, as
    DiffusionNFT draws them (a random permutation of the schedule per sample, the first K trained;
    NVlabs/DiffusionNFT scripts/train_nft_sd3.py:569, 810-816). Deterministic sampling has no policy steps, so the
    draw is over all of the schedule's steps."""
    count = max(1, int(num_steps * fraction))
    return torch.stack([torch.randperm(num_steps, generator=generator)[:count] for _ in range(batch_size)])
