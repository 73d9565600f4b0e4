"""Checkpoints: the full resumable state of a run after an epoch (DESIGN.md §6).

    checkpoints/epoch_NNNN/
      weights.safetensors       the policy's trainable weights (LoRA adapters, or the whole denoiser); with
                                train.ema_decay, their moving average (what `ddpo sample` loads and lora/ holds)
      training_weights.safetensors  with train.ema_decay, the trained weights themselves, which training resumes
      lora/...                  with LoRA on Stable Diffusion, diffusers' format (load_lora_weights)
      optimizer.pt              the policy optimizer's state
      deepspeed/                under DeepSpeed instead of optimizer.pt: DeepSpeed's own checkpoint, each rank's
                                ZeRO partition of the optimizer state (and of the fp32 weights)
      algorithm.pt              the algorithm's own state (beyond its trained modules)
      modules/NAME.safetensors  each module the algorithm registered (a value baseline, a critic), and
      modules/NAME.optimizer.pt its optimizer's state
      trainer.json              epoch, reward_queries, the per-prompt reward buffers

A checkpoint is written into a temporary directory and renamed when complete, so a crash never leaves a
half-written `epoch_NNNN`. Every rank calls `save_checkpoint` (gathering sharded state needs them all); the
main process writes. Under FSDP the files are the same as unsharded (ddpo.core.engine.distributed gathers the shards
and cuts them again on loading). Under DeepSpeed the weights are gathered the same way, but ZeRO's optimizer
state is flat partitions in DeepSpeed's own layout, so each rank writes its partition through the engine
(`save_checkpoint`) and reads it back (`load_checkpoint`): such a checkpoint resumes under DeepSpeed's same ZeRO
stage with the same number of processes, and `ddpo sample` reads its weights as any other. Tensors are read back
with `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CHECKPOINTS, checkpoint_path, list_checkpoints
from ddpo.core.engine.distributed import deepspeed_engine, load_optimizer_state, shard_like, whole
from ddpo.core.engine.distributed import optimizer_state as optimizer_state_of
from ddpo.core.engine.optim import POLICY
from ddpo.core.plugin_api.model import TRAINABLE_WEIGHTS

if TYPE_CHECKING:
    from ddpo.core.engine.run import Run

MODULES = "modules"
DEEPSPEED = "deepspeed"
TRAINING_WEIGHTS = "training_weights.safetensors"


def save_checkpoint(run: Run) -> Path:
    """Save the state after `run.epoch`; call on every rank. Returns the checkpoint directory."""
    accelerator = run.accelerator
    final = checkpoint_path(run.run_dir, run.epoch)
    staging = final.with_name(final.name + ".partial")
    engine = deepspeed_engine(accelerator)
    optimizer_state = optimizer_state_of(run.optimizer) if engine is None else None
    algorithm_state = run.algorithm.state_dict()
    extra_modules = {name: (_module_state(run, trained.module), optimizer_state_of(trained.optimizer))
                     for name, trained in run.modules.items() if name != POLICY}
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    if engine is not None:  # every rank writes its ZeRO partition
        accelerator.wait_for_everyone()
        engine.save_checkpoint(str(staging), tag=DEEPSPEED, save_latest=False, exclude_frozen_parameters=True)
        accelerator.wait_for_everyone()
    # under FSDP every rank gathers the weights; the main process writes them
    if run.weight_average is not None:
        training_weights = run.model.trainable_state_dict()  # on the CPU it shares the parameters' storage:
        if accelerator.is_main_process:  # written before the average is applied to them
            save_file(training_weights, str(staging / TRAINING_WEIGHTS))
        with run.weight_average.applied(), run.model.gathered_weights():
            if accelerator.is_main_process:
                run.model.save_weights(staging)
    else:
        with run.model.gathered_weights():
            if accelerator.is_main_process:
                run.model.save_weights(staging)
    if accelerator.is_main_process:
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(algorithm_state, staging / "algorithm.pt")
        if extra_modules:
            (staging / MODULES).mkdir()
        for name, (weights, optimizer) in extra_modules.items():
            save_file(weights, str(staging / MODULES / f"{name}.safetensors"))
            torch.save(optimizer, staging / MODULES / f"{name}.optimizer.pt")
        trainer_state = {"epoch": run.epoch, "reward_queries": run.reward_queries,
                         "stat_tracker": run.stat_tracker.state_dict() if run.stat_tracker else None,
                         "guard": run.guard.state_dict() if run.guard else None,
                         "average_optimizer_steps": run.weight_average.optimizer_steps if run.weight_average else None,
                         "deepspeed_processes": accelerator.num_processes if engine is not None else None}
        (staging / "trainer.json").write_text(json.dumps(trainer_state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        _prune(run.run_dir, run.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return final


def _module_state(run: Run, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict, unwrapped, detached, contiguous, on the CPU (for safetensors)."""
    state = run.accelerator.unwrap_model(module).state_dict()
    return {name: whole(tensor).to("cpu").contiguous() for name, tensor in state.items()}


def _prune(run_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore the policy, its optimizer, the algorithm, the counters and the reward buffers from `path`."""
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    _check_deepspeed_resume(run, path, state.get("deepspeed_processes"))
    engine = deepspeed_engine(run.accelerator)
    trained = path / TRAINING_WEIGHTS
    if engine is not None:  # the weights and each rank's partition of the optimizer state
        engine.load_checkpoint(str(path), tag=DEEPSPEED, load_module_strict=False, load_lr_scheduler_states=False)
    elif trained.is_file():  # saved with a moving average: weights.safetensors holds the average
        run.model.load_trainable_state_dict(load_file(str(trained)))
        average = load_file(str(path / TRAINABLE_WEIGHTS))
    else:
        run.model.load_weights(path)
        average = None
    if run.weight_average is not None:
        run.weight_average.load(average, state.get("average_optimizer_steps") or 0)
    if engine is None:
        load_optimizer_state(run.optimizer, torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    run.algorithm.load_state_dict(torch.load(path / "algorithm.pt", map_location="cpu", weights_only=True))
    for name, trained in run.modules.items():
        if name == POLICY:
            continue
        weights = path / MODULES / f"{name}.safetensors"
        if not weights.is_file():
            raise UsageError(f"checkpoint {path} has no weights for the algorithm's module '{name}' ({weights})")
        module = run.accelerator.unwrap_model(trained.module)
        held = module.state_dict()
        module.load_state_dict({key: shard_like(held[key], value) if key in held else value
                                for key, value in load_file(str(weights)).items()})
        load_optimizer_state(trained.optimizer, torch.load(path / MODULES / f"{name}.optimizer.pt",
                                                           map_location="cpu", weights_only=True))
    run.epoch, run.reward_queries = state["epoch"], state["reward_queries"]
    if run.stat_tracker is not None and state["stat_tracker"] is not None:
        run.stat_tracker.load_state_dict(state["stat_tracker"])
    if run.guard is not None:
        run.guard.load_state_dict(state.get("guard"))


def _check_deepspeed_resume(run: Run, path: Path, processes: int | None) -> None:
    """A checkpoint with DeepSpeed's per-rank partitions resumes only under DeepSpeed with as many processes, and
    one without them not under DeepSpeed."""
    under_deepspeed = deepspeed_engine(run.accelerator) is not None
    if processes is not None and not under_deepspeed:
        raise UsageError(f"checkpoint {path} holds DeepSpeed's per-rank optimizer state; resume it under the same "
                         f"--distributed zero2|zero3 with {processes} processes (its weights.safetensors loads "
                         "anywhere)")
    if processes is None and under_deepspeed:
        raise UsageError(f"checkpoint {path} was written without DeepSpeed; resume it without DeepSpeed")
    if under_deepspeed and processes != run.accelerator.num_processes:
        raise UsageError(f"checkpoint {path} holds DeepSpeed's partitions of {processes} processes; resume it with "
                         f"--num-processes {processes}, not {run.accelerator.num_processes}")


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or a UsageError saying there is none."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        raise UsageError(f"no checkpoint to resume in {Path(run_dir) / CHECKPOINTS}; "
                         "a run saves one after each epoch (see save_every)")
    return checkpoints[-1]
