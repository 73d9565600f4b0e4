"""The trainer: epochs of rollout -> rewards -> advantages -> algorithm update -> logging -> checkpoint.

Runs on one process or many through accelerate. Randomness is derived per (seed, epoch, process), so a run
resumed from the checkpoint of epoch N continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ddpo.core.configuration.config import RunConfig, eval_label
from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CONFIG_FILE
from ddpo.core.configuration.preflight import probe_rewards
from ddpo.core.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ddpo.core.engine.console import report_epoch
from ddpo.core.engine.distributed import make_accelerator
from ddpo.core.engine.ema import WeightAverage
from ddpo.core.engine.evaluation import EVAL_DIRECTORY, evaluate, evaluate_fixed_set
from ddpo.core.engine.guards import InterruptibleProgress, RunGuard, RunInterrupted, stop_cleanly
from ddpo.core.engine.images import animated_grid, make_grid, save_gif, save_png
from ddpo.core.engine.logging import RunLogger, truncate_metrics
from ddpo.core.engine.monitors import base_features, epoch_diversity
from ddpo.core.engine.multireward import combine_epoch_rewards
from ddpo.core.engine.onpolicy import SamplingGradients
from ddpo.core.engine.performance import compile_denoiser, make_optimizer, prepare_denoiser
from ddpo.core.engine.profiling import PHASES, EpochProfiler
from ddpo.core.engine.rollout import RolloutEngine
from ddpo.core.engine.run import Run, derive_seed
from ddpo.core.engine.sampling import ensure_device_available
from ddpo.core.engine.startup import load_reward
from ddpo.core.math.advantages import PerPromptStatTracker
from ddpo.core.plugin_api.base import Algorithm, PromptSet, Reward
from ddpo.core.plugin_api.model import Model
from ddpo.core.plugin_api.registry import get_plugin_manager, get_registry

GRID_IMAGES = 64
GRID_VIDEOS = 8
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_run_name(config: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.algorithm.name}__{config.reward.name}__{config.model.name}__s{config.seed}__{stamp}"


def _accelerator(config: RunConfig) -> Accelerator:
    ensure_device_available(config.device)
    return make_accelerator(config)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _run_dir(config: RunConfig, accelerator: Accelerator, resume_dir: Path | None) -> Path:
    """The run directory: the resumed one, or a new one named by the config (the same on every process)."""
    if resume_dir is not None:
        return Path(resume_dir)
    names = [config.run_name or default_run_name(config)]
    broadcast_object_list(names)
    config.run_name = names[0]
    run_dir = Path(config.logdir) / config.run_name
    if (run_dir / CONFIG_FILE).exists():
        raise UsageError(f"run directory {run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another --run-name")
    return run_dir


def train(config: RunConfig, resume_dir: Path | None = None, profile: bool = False) -> Path:
    """Train as the config says (resuming `resume_dir` from its newest checkpoint if given). With `profile`,
    one epoch is traced with torch.profiler into the run directory (ddpo.core.engine.profiling).

    Returns the run directory.
    """
    accelerator = _accelerator(config)
    hooks = get_plugin_manager().hook
    registry = get_registry()
    _seed_everything(config.seed)
    checkpoint = latest_checkpoint(resume_dir) if resume_dir is not None else None
    run_dir = _run_dir(config, accelerator, resume_dir)

    model: Model = registry.get("models", config.model.name)(config.model.options())
    reward: Reward = registry.get("rewards", config.reward.name)(config.reward.options())
    algorithm: Algorithm = registry.get("algorithms", config.algorithm.name)(config.algorithm.options())
    prompt_set: PromptSet = registry.get("prompts", config.prompts.name)(config.prompts.options())
    eval_rewards = {eval_label(section): registry.get("rewards", section.name)(section.options())
                    for section in config.eval.sections()}

    model.load(accelerator.device, DTYPES[config.mixed_precision])
    model.use_sde(config.sample.sde)
    model.configure_training()
    load_reward(reward, accelerator.device)
    for scorer in eval_rewards.values():
        load_reward(scorer, accelerator.device, role="eval.rewards")
    probe_rewards(model, [reward, *eval_rewards.values()], prompt_set, registry)
    optimizer = make_optimizer(model.trainable_parameters(), config.train)
    prepare_denoiser(model, config.train.gradient_checkpointing)
    if algorithm.needs_reference:
        model.prepare_reference()  # a copy of the unsharded weights (FSDP shards the denoiser in prepare)
    model.denoiser, optimizer = accelerator.prepare(model.denoiser, optimizer)
    model.autocast = accelerator.autocast
    compile_denoiser(model)
    gradients = (SamplingGradients(model.unwrapped_denoiser(), model.name,
                                   no_sync=lambda: accelerator.no_sync(model.denoiser))
                 if config.train.gradient_from_sampling else None)

    tracker = (PerPromptStatTracker(config.advantage.buffer_size, config.advantage.min_count)
               if config.advantage.per_prompt_stat_tracking else None)
    average = (WeightAverage(dict(model.trainable_named_parameters()), config.train.ema_decay,
                             config.train.ema_every) if config.train.ema_decay > 0 else None)
    run = Run(config=config, accelerator=accelerator, model=model, reward=reward, algorithm=algorithm,
              prompt_set=prompt_set, run_dir=run_dir, optimizer=optimizer, stat_tracker=tracker,
              eval_rewards=eval_rewards, weight_average=average)
    run.guard = RunGuard(accelerator, config.train)
    algorithm.setup(run)
    if checkpoint is not None:
        load_checkpoint(run, checkpoint)

    logger = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / CONFIG_FILE).write_text(config.to_yaml())
        if checkpoint is not None:
            truncate_metrics(run_dir, run.epoch)
        logger = RunLogger(run_dir, purge_step=run.reward_queries + 1 if checkpoint is not None else None)
        if checkpoint is None:
            logger.log_hparams(config.model_dump(mode="json"), ["reward/mean", "reward/max"])
    accelerator.wait_for_everyone()
    if config.eval.num_steps is not None:  # before any update: the pretrained weights' images (or a resume's file)
        run.base_eval_features = base_features(run, run_dir / EVAL_DIRECTORY)

    engine = RolloutEngine(model, reward, prompt_set, config.sample, group_size=algorithm.group_size(),
                           process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                           share_group_noise=algorithm.shares_group_noise(), gradients=gradients,
                           gradient_batches=(algorithm.on_policy_samples(config) // config.sample.batch_size
                                             if gradients is not None else 0),
                           keep_means=algorithm.needs_step_means)
    profiler = EpochProfiler(run_dir, first_epoch=run.epoch + 1, last_epoch=config.epochs,
                             enabled=profile and accelerator.is_main_process)
    hooks.on_run_start(run=run)
    grid_path = None
    try:
        with run.guard.handling_interrupts():
            for epoch in range(run.epoch + 1, config.epochs + 1):
                run.epoch = epoch
                with profiler.epoch(epoch):
                    record, grid_path = _train_epoch(run, engine, logger, hooks)
                hooks.on_epoch_end(run=run, epoch=epoch, metrics=record)
                if accelerator.is_main_process:
                    report_epoch(record, config.epochs)
                if epoch % config.save_every == 0 or epoch == config.epochs:
                    path = save_checkpoint(run)
                    hooks.on_checkpoint(run=run, path=path)
    except BaseException as error:
        reported = stop_cleanly(run, error)  # Ctrl-C: save what can be resumed first
        hooks.on_exception(run=run, exception=error)
        if reported is error:
            raise
        raise reported from None
    finally:
        hooks.on_run_end(run=run)
        engine.close()
        if logger is not None:
            logger.close()
    if accelerator.is_main_process:
        print(f"\nrun directory: {run_dir}", file=sys.stderr)
        print(f"look at it:    tensorboard --logdir {run_dir}", file=sys.stderr)
        if grid_path is not None:
            print(f"final samples: {grid_path}", file=sys.stderr)
    return run_dir


def _train_epoch(run: Run, engine: RolloutEngine, logger: RunLogger | None, hooks) -> tuple[dict, Path | None]:
    """One epoch; returns the logged record and the path of the epoch's image grid (main process)."""
    config, accelerator, epoch = run.config, run.accelerator, run.epoch
    started = time.perf_counter()
    _seed_everything(derive_seed(config.seed, epoch, accelerator.process_index, "global"))

    run.model.denoiser.eval()
    window = config.sample.sde_window
    sde_window = window.steps(config.sample.num_steps, epoch, config.seed) if window is not None else None
    offline = run.algorithm.offline_trajectories(run)
    if offline is not None:
        trajectory, images = offline
    else:
        with (run.progress(config.sample.batches_per_epoch, f"epoch {epoch}/{config.epochs} sampling") as bar,
              run.model.sampling(), run.algorithm.sampling_weights(run)):
            trajectory, images = engine.collect(
                run.generator("sample"), random.Random(derive_seed(config.seed, epoch, accelerator.process_index,
                                                                   "prompts")),
                progress=InterruptibleProgress(bar, run.guard),
                shared_rng=random.Random(derive_seed(config.seed, epoch, "group-prompts")),
                shared_generator=torch.Generator().manual_seed(derive_seed(config.seed, epoch, "group-noise")),
                sde_window=sde_window)
        run.sampled_gradients = engine.gradients.take() if engine.gradients is not None else None
    component_means = combine_epoch_rewards(run, trajectory)  # a multi reward's per-epoch combination, else {}
    hooks.on_rollout_end(run=run, trajectory=trajectory)

    run.gathered_rewards = accelerator.gather(trajectory.rewards.to(accelerator.device)).cpu()
    run.gathered_prompts = gather_object(trajectory.prompts)
    run.reward_queries += len(run.gathered_rewards)
    monitors = epoch_diversity(run, images)
    hooks.on_rewards(run=run, trajectory=trajectory)

    advantages = hooks.compute_advantages(run=run, trajectory=trajectory)
    if advantages is None:
        advantages = run.algorithm.compute_advantages(run, trajectory)
    clip = config.advantage.clip_max
    trajectory.advantages = advantages.to(trajectory.latents.device, torch.float32).clamp(-clip, clip)
    trajectory.validate()

    run.model.denoiser.train()
    run.guard.start_epoch()
    rewards = run.gathered_rewards
    scalars = {"reward/mean": rewards.mean(), "reward/std": rewards.std(unbiased=False),
               "reward/min": rewards.min(), "reward/max": rewards.max(), **component_means, **monitors}
    if sde_window is not None and offline is None:
        scalars["sample/sde_window_start"] = float(sde_window[0])
    try:
        with torch.profiler.record_function(PHASES["training"]):
            metrics = {**run.algorithm.update(run, trajectory), **run.guard.epoch_metrics()}
    except RunInterrupted:
        # Ctrl-C stopped the update after an optimizer step, and the epoch's checkpoint will hold that state: a
        # resume goes on with the next epoch, so this one's row is written now, with what the epoch has.
        _log_epoch(run, logger, {**scalars, **run.guard.epoch_metrics(), "train/interrupted": 1.0}, started, images)
        raise
    hooks.on_update_end(run=run, metrics=metrics)
    scalars.update(metrics)

    if epoch % config.eval.every == 0:
        if config.eval.num_steps is not None:
            scalars.update(evaluate_fixed_set(run, logger.writer if logger is not None else None))
        elif run.eval_rewards:
            scalars.update(evaluate(run, images, trajectory.prompts, trajectory.prompt_metadata))
    return _log_epoch(run, logger, scalars, started, images)


def _log_epoch(run: Run, logger: RunLogger | None, scalars: dict, started: float,
               images: torch.Tensor) -> tuple[dict, Path | None]:
    """Add the epoch's performance figures to its scalars and log them with its image grid (main process; videos
    (B, 3, F, H, W): the film strips of the first `GRID_VIDEOS` and their animated GIF too); returns the record and
    the grid's path."""
    rewards = run.gathered_rewards
    seconds = time.perf_counter() - started
    scalars.update({"perf/epoch_seconds": seconds, "perf/samples_per_second": len(rewards) / seconds,
                    "perf/peak_memory_mb": _peak_memory_mb(run.accelerator.device)})
    scalars = {tag: float(value) for tag, value in scalars.items()}

    record, grid_path = {"epoch": run.epoch, "reward_queries": run.reward_queries, **scalars}, None
    if logger is not None:
        videos = images.ndim == 5
        shown = images[:GRID_VIDEOS if videos else GRID_IMAGES]
        grid = make_grid(shown)
        grid_path = save_png(grid, run.run_dir / "samples" / f"epoch_{run.epoch:04d}.png")
        animation = animated_grid(shown) if videos else None
        if animation is not None:
            save_gif(animation, run.run_dir / "samples" / f"epoch_{run.epoch:04d}.gif")
        record = logger.log_epoch(run.epoch, run.reward_queries, scalars, {"reward/distribution": rewards}, grid,
                                  animation)
    return record, grid_path
