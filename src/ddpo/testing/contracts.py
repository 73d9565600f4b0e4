"""Contract checks for plugin authors: call a plugin the way the trainer does and assert on the answers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any

import pydantic
import torch

from ddpo.core.engine.rollout import sample_batch, score
from ddpo.core.plugin_api.base import Options, PromptSet, Reward
from ddpo.core.plugin_api.model import Model


def check_reward(reward_cls: type[Reward], options: dict[str, Any] | None = None, batch_size: int = 3,
                 image_size: int = 32, check_import: bool = True) -> torch.Tensor:
    """Load the reward, score random images (B, 3, H, W) in [0, 1] twice, and return its rewards (B,).

    Fails if the class lacks a name or an options model that validates `options` and refuses unknown keys, if
    the answer is not B finite floats, if scoring the same batch again gives other values, or (`check_import`)
    if importing the module that defines the class imports torch (`ddpo list` must stay light).
    """
    assert reward_cls.name, f"{reward_cls.__qualname__} needs a `name`"
    assert isinstance(reward_cls.Options, type) and issubclass(reward_cls.Options, Options), \
        f"{reward_cls.__qualname__}.Options must subclass ddpo.Options"
    try:
        validated = reward_cls.Options.model_validate(options or {})
    except pydantic.ValidationError as error:
        raise AssertionError(f"{reward_cls.__qualname__}.Options rejects {options}: {error}") from None
    try:
        reward_cls.Options.model_validate({**(options or {}), "no_such_option_": 1})
    except pydantic.ValidationError:
        pass
    else:
        raise AssertionError(f"{reward_cls.__qualname__}.Options accepts unknown keys; subclass ddpo.Options")
    reward = reward_cls(validated)
    reward.load(torch.device("cpu"))
    images = torch.rand(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat"] * batch_size
    try:
        first = score(reward, images, prompts, [{} for _ in prompts])
        again = score(reward, images.clone(), list(prompts), [{} for _ in prompts])
    except RuntimeError as error:
        raise AssertionError(str(error)) from None
    assert torch.allclose(first, again, rtol=1e-5, atol=1e-6), \
        f"reward '{reward_cls.name}' is not deterministic: {first.tolist()} then {again.tolist()} for the same batch"
    if check_import:
        _check_imports_no_torch(reward_cls.__module__)
    return first


def _check_imports_no_torch(module: str) -> None:
    """Import `module` in a fresh interpreter (this one's sys.path) and fail if that imported torch."""
    probe = f"import importlib, sys; importlib.import_module({module!r}); print('TORCH', 'torch' in sys.modules)"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, f"importing {module} failed: {result.stderr.strip()[-500:]}"
    assert "TORCH False" in result.stdout, \
        f"importing {module} imports torch; import heavy libraries inside load() or __call__"


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
