"""The hooks a plugin can implement. Decorate module-level functions with `@ddpo.hookimpl`.

Registration hooks run whenever the plugin registry is built (every CLI command, in every process).
Lifecycle hooks run inside `ddpo run` on the ranks each one names; "every rank" means once per process
under `accelerate launch`, with that process's own data unless the hook says the data is gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    import typer

    from ddpo.core.engine.run import Run
    from ddpo.core.plugin_api.base import Algorithm, PromptSet, Reward
    from ddpo.core.plugin_api.model import Model
    from ddpo.core.plugin_api.schema import Trajectory

hookspec = pluggy.HookspecMarker("ddpo")
hookimpl = pluggy.HookimplMarker("ddpo")


@hookspec
def register_algorithms(register: Callable[[type[Algorithm]], None]) -> None:
    """Register algorithm classes.

    :param register: call it once per `ddpo.Algorithm` subclass; the class's `name` is the `--algo` value.
    """


@hookspec
def register_rewards(register: Callable[[type[Reward]], None]) -> None:
    """Register reward classes.

    :param register: call it once per `ddpo.Reward` subclass; the class's `name` is the `--reward` value.
    """


@hookspec
def register_models(register: Callable[[type[Model]], None]) -> None:
    """Register model classes.

    :param register: call it once per `ddpo.Model` subclass; the class's `name` is the `--model` value.
    """


@hookspec
def register_prompts(register: Callable[[type[PromptSet]], None]) -> None:
    """Register prompt sets.

    :param register: call it once per `ddpo.PromptSet` subclass; the class's `name` is `prompts.name`.
    """


@hookspec
def register_presets(register: Callable[[str | Path], None]) -> None:
    """Register presets: YAML files of a config plus a `preset:` mapping ({paper, gpus, description}).

    :param register: call it once per preset file; the file's stem is the `--preset` value.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add CLI commands. Called when the CLI starts, before arguments are parsed.

    :param app: the `ddpo` typer application; decorate functions with `@app.command()`.
    """


@hookspec
def on_run_start(run: Run) -> None:
    """Called on every rank once the model, reward, optimizer and algorithm are set up (after a resume has
    restored the checkpoint), before the first epoch.

    :param run: the run: config, accelerator, model, reward, algorithm, run directory, epoch counters.
    """


@hookspec
def on_rollout_end(run: Run, trajectory: Trajectory) -> None:
    """Called on every rank after the epoch's sampling, when this rank's rewards have been computed.

    :param run: the run.
    :param trajectory: this rank's trajectories of the epoch, `rewards` (B,) filled, `advantages` still None.
    """


@hookspec
def on_rewards(run: Run, trajectory: Trajectory) -> None:
    """Called on every rank after the rewards of all ranks were gathered (`run.gathered_rewards`, (N,)
    over all processes, and `run.gathered_prompts`), before advantages are computed. To change how rewards
    become advantages, implement `compute_advantages`.

    :param run: the run.
    :param trajectory: this rank's trajectories of the epoch.
    """


@hookspec(firstresult=True)
def compute_advantages(run: Run, trajectory: Trajectory) -> torch.Tensor | None:
    """Return advantages for this rank's trajectories, (B,) or (B, T), to replace the algorithm's own.
    Called on every rank; the first non-None result wins (return None to pass). The trainer clips the result
    to +-advantage.clip_max, as it does the algorithm's.

    :param run: the run; `run.gathered_rewards` and `run.gathered_prompts` hold the whole epoch over all ranks.
    :param trajectory: this rank's trajectories of the epoch, `rewards` filled.
    """


@hookspec
def on_update_end(run: Run, metrics: dict[str, float]) -> None:
    """Called on every rank after the algorithm's update of the epoch.

    :param run: the run.
    :param metrics: the update's scalars (tag -> value), editable: what is here gets logged.
    """


@hookspec
def on_epoch_end(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Called on every rank after the epoch's metrics were logged (only the main process writes logs).

    :param run: the run.
    :param epoch: the epoch that ended, numbered from 1.
    :param metrics: every scalar logged for the epoch, including `epoch` and `reward_queries`.
    """


@hookspec
def on_checkpoint(run: Run, path: Path) -> None:
    """Called on every rank after a checkpoint is complete on disk.

    :param run: the run.
    :param path: the checkpoint directory, `{run_dir}/checkpoints/epoch_NNNN`.
    """


@hookspec
def on_exception(run: Run, exception: BaseException) -> None:
    """Called on every rank when the run fails after `on_run_start`: an error in an epoch or a hook, Ctrl-C
    (after the interrupted run's checkpoint was saved) or a run stopped by the numerical guards. `on_run_end`
    follows.

    :param run: the run; `run.epoch` is the epoch that failed.
    :param exception: what was raised (KeyboardInterrupt for a second Ctrl-C, `ddpo.core.engine.guards.RunInterrupted`
        for the first).
    """


@hookspec
def on_run_end(run: Run) -> None:
    """Called on every rank once the run is over: after the last epoch and its checkpoint, and also when the
    run failed (after `on_exception`), so a plugin that saw `on_run_start` can always release its resources.

    :param run: the run.
    """
