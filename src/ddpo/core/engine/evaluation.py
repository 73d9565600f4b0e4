"""Evaluation during training: cross-reward scores, and a fixed set of images to compare across epochs and runs.

With `eval.num_steps` set, every `eval.every` epochs the trainer samples (with the moving average of the
weights, if `train.ema_decay` keeps one) the same prompts from the same initial noise (`sample.batch_size` images
per process, seeded by the run seed and the process, not by the epoch), with `sample.eta` and generators of its
own: the training run's random streams are untouched, so its training
metrics are the same with or without evaluation. The images are scored by the training reward and every eval
reward; process 0's grid is saved as `eval/epoch_NNNN.png` and logged to TensorBoard as the image `eval/images`.
TensorBoard images have no per-step caption, so the caption is the text `eval/captions` at the same step: a
table of each grid cell's prompt and rewards, in the grid's order (row by row). Videos make one film-strip row
each in those grids, and their animated grid is saved as `eval/epoch_NNNN.gif` and logged as `eval/videos`. With
the base model's features (`Run.base_eval_features`, see ddpo.core.engine.monitors) it also measures
`monitor/drift`.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ddpo.core.engine.images import animated_grid, make_grid, save_gif, save_png
from ddpo.core.engine.logging import add_animation
from ddpo.core.engine.monitors import drift, gather_features
from ddpo.core.engine.rollout import RolloutEngine, sample_batch, score
from ddpo.core.engine.run import Run, derive_seed

EVAL_DIRECTORY = "eval"


def evaluation_samples(run: Run) -> tuple[torch.Tensor, list[str], list[dict]]:
    """Sample the fixed evaluation set: `sample.batch_size` images per process from the same prompts and seeds
    every epoch, with `eval.num_steps` steps. Returns the images and their prompts and metadata."""
    config = run.config
    seed = derive_seed(config.seed, run.accelerator.process_index, "evaluation")
    engine = RolloutEngine(run.model, run.reward, run.prompt_set, config.sample)
    prompts, metadata = engine.draw_prompts(random.Random(seed))
    engine.close()
    run.model.denoiser.eval()
    with run.evaluation_weights():
        _, images = sample_batch(run.model, prompts, metadata, num_steps=config.eval.num_steps,
                                 eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
                                 generator=torch.Generator().manual_seed(seed))
    return images.cpu(), prompts, metadata


def score_images(run: Run, images: torch.Tensor, prompts: list[str], metadata: list[dict],
                 scorers: dict | None = None) -> dict[str, torch.Tensor]:
    """This process's images scored by `scorers` and every evaluation reward: label -> (N,) on the CPU."""
    size = run.config.sample.batch_size
    return {label: torch.cat([score(scorer, images[start:start + size].to(run.accelerator.device),
                                    prompts[start:start + size], metadata[start:start + size]).float().cpu()
                              for start in range(0, len(images), size)])
            for label, scorer in {**(scorers or {}), **run.eval_rewards}.items()}


def mean_scores(run: Run, scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """`eval/<label>/mean` of every label's scores over all processes."""
    return {f"eval/{label}/mean": run.accelerator.gather(values.to(run.accelerator.device)).mean()
            for label, values in scores.items()}


def evaluate(run: Run, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, float]:
    """`eval/<label>/mean` of the images' scores by every evaluation reward, over all processes."""
    return mean_scores(run, score_images(run, images, prompts, metadata))


def evaluate_fixed_set(run: Run, writer=None) -> dict[str, float]:
    """Sample and score the fixed evaluation set; on the main process save its grid and, given a TensorBoard
    `writer`, log the grid and its caption at step = reward queries. Returns the `eval/<label>/mean` scalars and
    `monitor/drift` (given the base's features)."""
    images, prompts, metadata = evaluation_samples(run)
    scores = score_images(run, images, prompts, metadata, {run.config.reward.name: run.reward})
    scalars = {**mean_scores(run, scores), **drift(gather_features(run, images), run.base_eval_features)}
    if run.is_main:
        grid = make_grid(images)
        save_png(grid, Path(run.run_dir) / EVAL_DIRECTORY / f"epoch_{run.epoch:04d}.png")
        animation = animated_grid(images) if images.ndim == 5 else None
        if animation is not None:
            save_gif(animation, Path(run.run_dir) / EVAL_DIRECTORY / f"epoch_{run.epoch:04d}.gif")
        if writer is not None:
            writer.add_image("eval/images", grid, global_step=run.reward_queries)
            if animation is not None:
                add_animation(writer, "eval/videos", animation, run.reward_queries)
            writer.add_text("eval/captions", caption(prompts, scores), global_step=run.reward_queries)
    return scalars


def caption(prompts: list[str], scores: dict[str, torch.Tensor]) -> str:
    """A Markdown table: one row per image in grid order, its prompt and every reward."""
    labels = list(scores)
    lines = ["| image | prompt | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for index, prompt in enumerate(prompts):
        values = " | ".join(f"{float(scores[label][index]):.4g}" for label in labels)
        lines.append(f"| {index} | {prompt or '(unconditional)'} | {values} |")
    return "\n".join(lines)
