"""`ddpo pairs export`: sampled pairs for people to label, D3PO's human feedback (DESIGN.md §4).

Each pair is two trajectories with the same prompt and initial noise, as `ddpo run --algo d3po` samples them.
The export keeps their tensors, so the labelled pairs train exactly as sampled:
`ddpo run --algo d3po --set algorithm.labels=DIR/labels.jsonl` with the same model and sampler settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ddpo.cli.flags import ConfigFlag, DeviceFlag, ModelFlag, SeedFlag, SetFlag, checkpoint_config, config_layer
from ddpo.core.configuration.config import RunConfig, resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.preflight import check_output_directory
from ddpo.plugins.algorithms.d3po import (EXPORT_FILE, PAIRS_FILE, README_FILE, SAMPLER_SETTINGS, TRAJECTORY_FILE,
                                        flat_prompt_embeds)

PAIR_IMAGE_SIDE = 256
"""Each image of a pair PNG is enlarged (nearest neighbour) to at least this many pixels a side."""
README = """\
Pairs to label for D3PO ({count} pairs, made by `ddpo pairs export`).

Each pair_NNNN.png shows two images drawn for the same prompt (in pairs.jsonl) from the same starting noise:
image 0 on the left, image 1 on the right. For every pair you judge, write one line to a labels file,
e.g. labels.jsonl in this directory:

    {{"pair": 0, "preferred": 0}}        the left image is better
    {{"pair": 1, "preferred": 1}}        the right image is better
    {{"pair": 2, "preferred": "tie"}}    no preference (the pair is not trained on)

Pairs you leave out are not trained on. Several lines for one pair count as votes (several labellers).
Then train on the labels, with the same model and sampler settings as this export (export.json):

    ddpo run --algo d3po --set algorithm.labels={directory}/labels.jsonl{flags}
"""


def _load_model(config: RunConfig, checkpoint: Path | None):
    """The config's model, with a checkpoint's trained weights over it if given, ready to sample."""
    import torch

    from ddpo.core.engine.sampling import pick_device
    from ddpo.core.plugin_api.registry import get_registry

    model = get_registry().get("models", config.model.name)(config.model.options())
    model.load(pick_device(config), torch.float32)
    model.use_sde(config.sample.sde)
    if checkpoint is not None:
        model.configure_training()
        model.load_weights(checkpoint)
    model.denoiser.eval()
    return model


def export_pairs(config: RunConfig, out: Path, count: int, checkpoint: Path | None = None) -> None:
    """Sample `count` pairs with the config's model and sampler settings and write the export into `out`."""
    import random

    import torch
    from safetensors.torch import save_file

    from ddpo.core.engine.images import make_grid, save_png
    from ddpo.core.engine.rollout import sample_batch
    from ddpo.core.plugin_api.registry import get_registry
    from ddpo.core.plugin_api.schema import Trajectory

    model = _load_model(config, checkpoint)
    prompt_set = get_registry().get("prompts", config.prompts.name)(config.prompts.options())
    rng, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    pairs_per_batch = config.sample.batch_size // 2
    parts, images, entries = [], [], []
    for first in range(0, count, pairs_per_batch):
        drawn = [prompt_set.sample(rng) for _ in range(min(pairs_per_batch, count - first))]
        drawn = [(prompt if model.conditional else "", metadata) for prompt, metadata in drawn]
        entries += [{"pair": first + index, "prompt": prompt, "metadata": metadata}
                    for index, (prompt, metadata) in enumerate(drawn)]
        trajectory, batch_images = sample_batch(
            model, [prompt for prompt, _ in drawn for _ in (0, 1)], [metadata for _, metadata in drawn for _ in (0, 1)],
            num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
            generator=generator, group_size=2, first_group_id=first)
        parts.append(trajectory)
        images.append(batch_images.cpu())
    trajectory, images = Trajectory.cat(parts), torch.cat(images)

    out.mkdir(parents=True, exist_ok=True)
    tensors = {"latents": trajectory.latents, "timesteps": trajectory.timesteps,
               "prev_timesteps": trajectory.prev_timesteps, "log_probs": trajectory.log_probs,
               "policy_steps": trajectory.policy_steps, "group_ids": trajectory.group_ids}
    tensors.update(flat_prompt_embeds(trajectory.prompt_embeds))
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
              str(out / TRAJECTORY_FILE))
    with (out / PAIRS_FILE).open("w") as listing:
        for entry in entries:
            image = f"pair_{entry['pair']:04d}.png"
            pair_images = images[2 * entry["pair"]:2 * entry["pair"] + 2]
            save_png(make_grid(pair_images, columns=2, padding=8, min_cell=PAIR_IMAGE_SIDE), out / image)
            listing.write(json.dumps({"pair": entry["pair"], "prompt": entry["prompt"], "image": image,
                                      "left": 0, "right": 1}) + "\n")
    (out / EXPORT_FILE).write_text(json.dumps({
        "model": {"name": config.model.name, "options": config.model.options()},
        "sample": {key: getattr(config.sample, key) for key in SAMPLER_SETTINGS},
        "prompts": {"name": config.prompts.name, "options": config.prompts.options()},
        "seed": config.seed, "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "pairs": entries}, indent=2))
    pretrained = config.model.options().get("pretrained")
    flags = f" --model {config.model.name}" + (f" --set model.pretrained={pretrained}" if pretrained else "") + "".join(
        f" --set sample.{key}={getattr(config.sample, key)}" for key in SAMPLER_SETTINGS)
    (out / README_FILE).write_text(README.format(count=count, directory=out, flags=flags))


pairs_app = typer.Typer(name="pairs", no_args_is_help=True,
                        help="Pairs of samples for people to label (D3PO human feedback).")


@pairs_app.command("export")
def export(out: Annotated[Path, typer.Option("--out", help="Directory to write the pairs to (new or empty).")],
           model: ModelFlag = None, config: ConfigFlag = None, set_: SetFlag = None,
           checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint directory "
                                                           "RUN/checkpoints/epoch_NNNN to sample from.")] = None,
           num: Annotated[int, typer.Option("--num", min=1, help="Number of pairs.")] = 16,
           seed: SeedFlag = None, device: DeviceFlag = None):
    """Sample pairs (same prompt, same initial noise) with d3po's sampler settings for people to label."""
    check_output_directory(out, "output directory", "give --out a directory you can write to")
    if (out / EXPORT_FILE).exists():
        raise UsageError(f"{out} already holds a pair export; choose another --out")
    resolved = resolve_config(config, set_ or [], config_layer("d3po", model=model, seed=seed, device=device),
                              base=checkpoint_config(checkpoint))
    export_pairs(resolved, out, num, checkpoint)
    typer.echo(f"wrote {num} pairs to {out}; label them as {out / README_FILE} says")
