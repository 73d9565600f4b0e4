"""Checks of a run's input that need no weights: they run before anything loads or is written, so a mistake
costs seconds, not a model load (or a GPU allocation) followed by a crash."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ddpo.core.errors import UsageError

FIXED_ON_RESUME = ("algorithm.name", "model.name", "model.pretrained", "model.use_lora", "model.lora_rank",
                   "sample.batch_size", "sample.batches_per_epoch", "sample.num_steps",
                   "train.batch_size", "train.grad_accum")
"""Keys a resumed run must keep: the checkpoint's weights, optimizer and algorithm state are shaped by them."""


def check_logdir(logdir: str | Path) -> None:
    """A log directory must exist as a writable directory, or be creatable under one."""
    path = Path(logdir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot create log directory {path}: {existing} is a file; give --logdir a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"log directory {path} is not writable ({existing} denies writing); give --logdir a "
                         "directory you can write to")


def _value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def check_resume(saved: dict[str, Any], resolved: dict[str, Any]) -> None:
    """A resumed run's config must keep FIXED_ON_RESUME as the saved run had them."""
    for key in FIXED_ON_RESUME:
        before, now = _value(saved, key), _value(resolved, key)
        if before != now:
            raise UsageError(f"'{key}' cannot change when resuming: the run has {before!r}, this command gives "
                             f"{now!r}; drop the flag, or start a new run")


PROBE_IMAGES = 2


def probe_rewards(model, rewards: list, prompt_set, registry) -> None:
    """Score a few images of the model's shape (its decoded initial noise) with each reward, before the run
    writes anything: a reward that raises, answers with the wrong shape or with non-finite values stops the run
    here, named with its package, rather than after the first epoch's sampling."""
    import random

    import torch

    from ddpo.core.multireward import MultiReward
    from ddpo.core.rollout import score

    with torch.no_grad():
        images = model.decode(model.initial_noise(PROBE_IMAGES, torch.Generator().manual_seed(0)))
    drawn = [prompt_set.sample(random.Random(index)) for index in range(PROBE_IMAGES)]
    prompts = [prompt if model.conditional else "" for prompt, _ in drawn]
    metadata = [dict(meta) for _, meta in drawn]
    scorers = [part for reward in rewards
               for part in (reward.rewards.values() if isinstance(reward, MultiReward) else [reward])]
    for reward in scorers:
        try:
            score(reward, images, prompts, metadata)
        except Exception as error:
            info = registry.plugins["rewards"].get(reward.name)
            package = info.package if info is not None else "unknown"
            raise UsageError(f"reward '{reward.name}' (package {package}) failed on a probe batch of "
                             f"{PROBE_IMAGES} images: {type(error).__name__}: {' '.join(str(error).split())}") from None
