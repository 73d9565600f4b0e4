"""Contract checks for plugin authors: call a plugin the way the trainer does and assert on the answers."""

from __future__ import annotations

import random
from typing import Any

import torch

from ddpo.core.base import PromptSet, Reward
from ddpo.core.model import Model
from ddpo.core.rollout import sample_batch, score


def check_reward(reward_cls: type[Reward], options: dict[str, Any] | None = None, batch_size: int = 3,
                 image_size: int = 32) -> torch.Tensor:
    """Load the reward, score random images (B, 3, H, W) in [0, 1], and return its rewards (B,).

    Fails if the class lacks a name or options model, or if the answer is not B finite floats.
    """
    assert reward_cls.name, f"{reward_cls.__qualname__} needs a `name`"
    reward = reward_cls(options or {})
    reward.load(torch.device("cpu"))
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat"] * batch_size
    try:
        return score(reward, images, prompts, [{} for _ in prompts])
    except RuntimeError as error:
        raise AssertionError(str(error)) from None


def check_prompt_set(prompt_set_cls: type[PromptSet], options: dict[str, Any] | None = None,
                     draws: int = 8) -> list[str]:
    """Draw prompts twice with the same seed; they must be (str, dict) pairs and reproducible."""
    prompt_set = prompt_set_cls(options or {})
    first = [prompt_set.sample(random.Random(0)) for _ in range(draws)]
    again = [prompt_set.sample(random.Random(0)) for _ in range(draws)]
    for prompt, metadata in first:
        assert isinstance(prompt, str) and isinstance(metadata, dict), \
            f"{prompt_set_cls.__qualname__}.sample must return (str, dict), got ({prompt!r}, {metadata!r})"
    assert first == again, f"{prompt_set_cls.__qualname__}.sample is not reproducible with the same rng seed"
    return [prompt for prompt, _ in first]


def check_model(model_cls: type[Model], options: dict[str, Any] | None = None, batch_size: int = 2,
                num_steps: int = 3) -> torch.Tensor:
    """Load the model on the CPU, sample a few steps, and check the trajectory and images; returns the images."""
    model = model_cls(options or {})
    model.load(torch.device("cpu"), torch.float32)
    prompts = ["a cat"] * batch_size if model.conditional else [""] * batch_size
    trajectory, images = sample_batch(model, prompts, [{} for _ in prompts], num_steps=num_steps, eta=1.0,
                                      guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert trajectory.latents.shape == (batch_size, num_steps + 1, *model.sample_shape()), \
        f"latents have shape {tuple(trajectory.latents.shape)}"
    assert torch.isfinite(trajectory.log_probs).all(), "log-probabilities are not finite"
    assert trajectory.policy_steps.any(), "no step of the sampler is stochastic"
    assert images.shape[:2] == (batch_size, 3) and images.min() >= 0 and images.max() <= 1, \
        f"decode must give (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}"
    return images
