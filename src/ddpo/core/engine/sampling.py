"""`ddpo sample`: draw images from a model, base or fine-tuned, into one grid PNG (a video model's: film strips, or
an animated GIF)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import torch

from ddpo.core.configuration.config import RunConfig
from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.images import animated_grid, make_grid, save_gif, save_png
from ddpo.core.engine.rollout import sample_batch
from ddpo.core.plugin_api.registry import get_registry


def ensure_device_available(device: str) -> None:
    """A usage error if `device` (a config value) names hardware this machine does not have."""
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA GPU is visible; valid here: auto, cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' was asked for but MPS is not available; valid here: auto, cpu")


def pick_device(config: RunConfig) -> torch.device:
    ensure_device_available(config.device)
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def sample_grid(config: RunConfig, out: Path, checkpoint: Path | None = None, prompts: list[str] = (),
                count: int = 16) -> Path:
    """Sample `count` images with the config's model and sampler settings and write them as a grid to `out`: a PNG,
    or for a video model a PNG of film strips or (`out` a .gif) the videos as one animated grid.

    With `checkpoint`, the trained weights of that checkpoint are loaded over the base model. Prompts cycle
    through `prompts`, or are drawn from the config's prompt set.
    """
    registry = get_registry()
    model = registry.get("models", config.model.name)(config.model.options())
    model.load(pick_device(config), torch.float32)
    animated = Path(out).suffix.lower() == ".gif"
    if animated and len(model.sample_shape()) != 4:
        raise UsageError(f"--out {Path(out).name}: a GIF needs a video model, and model '{config.model.name}' makes "
                         "images; write a .png")
    model.use_sde(config.sample.sde)
    if checkpoint is not None:
        model.configure_training()
        model.load_weights(checkpoint)
    model.denoiser.eval()
    prompt_set = registry.get("prompts", config.prompts.name)(config.prompts.options())
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    given = itertools.cycle(prompts) if prompts else None
    images = []
    for start in range(0, count, config.sample.batch_size):
        size = min(config.sample.batch_size, count - start)
        drawn = [(next(given), {}) if given else prompt_set.sample(rng) for _ in range(size)]
        batch_prompts = [prompt if model.conditional else "" for prompt, _ in drawn]
        _, batch_images = sample_batch(model, batch_prompts, [meta for _, meta in drawn],
                                       num_steps=config.sample.num_steps, eta=config.sample.eta,
                                       guidance_scale=config.sample.guidance_scale, generator=generator)
        images.append(batch_images.cpu())
    if animated:
        return save_gif(animated_grid(torch.cat(images)), out)
    return save_png(make_grid(torch.cat(images)), out)
