"""Guards that keep a long run's failures cheap: Ctrl-C stops at a safe point, and non-finite or spiking
gradients are caught at the optimizer step instead of ruining the weights.

One `RunGuard` lives on the `Run` and is shared by every gradient accumulator of the run, so its counts
span an epoch's updates and its state (the run of skipped steps, the gradient-norm average) is saved in the
checkpoint, keeping `--resume` exact. Decisions are made from values that are the same on every process
(gradient norms after the all-reduce; flags reduced with `max`), so all ranks skip or stop together.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ddpo.core.configuration.config import TrainConfig

INTERRUPTED_EXIT_CODE = 130
SAMPLING = "sampling"
"""`RunInterrupted`'s argument when the run stopped between sampling batches (no weights changed yet)."""
SPIKE_WARMUP_STEPS = 5
"""Optimizer steps whose gradient norms only feed the running average before spikes are counted."""
SPIKE_AVERAGE_DECAY = 0.9
"""Weight of the past in the running average of finite gradient norms the spike detector compares with."""


class RunInterrupted(Exception):
    """The user asked the run to stop (Ctrl-C); raised at the next safe point, after the current optimizer
    step or sampling batch."""

    def __init__(self, *args, report: bool = True):
        super().__init__(*args)
        self.report = report
        """Whether the command prints the message: in a multi-process run only the main process does, for all."""


class TrainingDiverged(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class RunGuard:
    """The run's Ctrl-C flag and numerical guards.

    Use `with guard.handling_interrupts():` around the epochs (main thread only). The first SIGINT only sets
    a flag that `check_interrupt()` turns into `RunInterrupted` at the next safe point; the second raises
    KeyboardInterrupt at once.
    """

    def __init__(self, accelerator: Accelerator, train_config: TrainConfig):
        self.accelerator = accelerator
        self.max_skipped_steps = train_config.max_skipped_steps
        self.spike_factor = train_config.grad_norm_spike_factor
        self.interrupt_requested = False
        self.consecutive_skips = 0
        self.norm_average: float | None = None
        self.finite_steps = 0
        self.epoch_skipped_steps = 0
        self.epoch_spikes = 0
        self.epoch_steps = 0
        """Optimizer steps taken (not skipped) in the current epoch."""
        self.stopped_mid_epoch = False
        """Set when Ctrl-C stopped an epoch's update: its checkpoint holds a partly updated epoch."""

    # Ctrl-C

    def handling_interrupts(self):
        return _SigintHandler(self)

    def _on_sigint(self) -> None:
        self.interrupt_requested = True

    def check_interrupt(self, phase: str = "update") -> None:
        """Raise `RunInterrupted(phase)` if any process was asked to stop (a collective call: every rank calls
        it at the same point)."""
        if self._any_process(self.interrupt_requested):
            raise RunInterrupted(phase)

    # Numerical guards

    def start_epoch(self) -> None:
        self.epoch_skipped_steps = self.epoch_spikes = self.epoch_steps = 0

    def should_skip(self, losses_finite: bool, grad_norms: list[float]) -> bool:
        """Judge one optimizer step from its micro-steps' losses and its modules' gradient norms (before
        clipping); counts skips and spikes. Raises `TrainingDiverged` after `max_skipped_steps` skips in a row."""
        finite = self._all_processes(losses_finite) and all(math.isfinite(norm) for norm in grad_norms)
        if not finite:
            self.consecutive_skips += 1
            self.epoch_skipped_steps += 1
            warnings.warn(f"skipped an optimizer step: non-finite loss or gradient (norms {grad_norms}); "
                          f"{self.consecutive_skips} in a row, the run stops at {self.max_skipped_steps}",
                          RuntimeWarning, stacklevel=3)
            if self.consecutive_skips >= self.max_skipped_steps:
                raise TrainingDiverged(f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or "
                                       "gradient (train.max_skipped_steps); the run stopped, its checkpoints "
                                       "hold the last good state (lower train.learning_rate, or use "
                                       "mixed_precision=bf16 or no instead of fp16)")
            return True
        self.consecutive_skips = 0
        self.epoch_steps += 1
        self._watch_spikes(max(grad_norms))
        return False

    def _watch_spikes(self, norm: float) -> None:
        if self.spike_factor is None:
            return
        if self.finite_steps >= SPIKE_WARMUP_STEPS and norm > self.spike_factor * self.norm_average:
            self.epoch_spikes += 1
        self.norm_average = norm if self.norm_average is None else (
            SPIKE_AVERAGE_DECAY * self.norm_average + (1 - SPIKE_AVERAGE_DECAY) * norm)
        self.finite_steps += 1

    def epoch_metrics(self) -> dict[str, float]:
        metrics = {"train/skipped_steps": float(self.epoch_skipped_steps)}
        if self.spike_factor is not None:
            metrics["train/grad_norm_spikes"] = float(self.epoch_spikes)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive_skips": self.consecutive_skips, "norm_average": self.norm_average,
                "finite_steps": self.finite_steps, "stopped_mid_epoch": self.stopped_mid_epoch}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.consecutive_skips = state["consecutive_skips"]
            self.norm_average = state["norm_average"]
            self.finite_steps = state["finite_steps"]
            if state["stopped_mid_epoch"] and self.accelerator.is_main_process:
                print("ddpo: this checkpoint was saved by Ctrl-C during its epoch's update; the run continues with "
                      "the next epoch", file=sys.stderr)

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        import torch

        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def _all_processes(self, flag: bool) -> bool:
        return not self._any_process(not flag)


class _SigintHandler:
    """First SIGINT: set the guard's flag and say what happens; second: the default KeyboardInterrupt."""

    def __init__(self, guard: RunGuard):
        self.guard = guard
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self.guard

    def _handle(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.guard._on_sigint()
        if self.guard.accelerator.is_main_process:
            print("\nddpo: interrupted; stopping after the current optimizer step or sampling batch and saving a "
                  "checkpoint (press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class InterruptibleProgress:
    """A progress bar whose every `update` is a safe point to stop at (between sampling batches)."""

    def __init__(self, bar, guard: RunGuard):
        self.bar = bar
        self.guard = guard

    def update(self, count: int = 1) -> None:
        self.bar.update(count)
        self.guard.check_interrupt(SAMPLING)

    def __getattr__(self, name: str):
        return getattr(self.bar, name)


def stop_cleanly(run, error: BaseException) -> BaseException:
    """What to report for a run that raised `error`. On Ctrl-C (`RunInterrupted`), first save a checkpoint:
    stopped while sampling, the state after the previous epoch (if not saved yet), from which `--resume`
    continues exactly; stopped during the update, the state after the current optimizer step, as the epoch's
    checkpoint (a resume continues with the next epoch). A second Ctrl-C (KeyboardInterrupt) saves nothing."""
    from ddpo.core.engine.checkpoint import checkpoint_path, list_checkpoints, save_checkpoint

    report = run.accelerator.is_main_process
    resume = (f"continue with: ddpo run --resume {run.run_dir}" if run.accelerator.num_processes == 1 else
              f"continue with the same launch command and: ddpo run --resume {run.run_dir}")
    if isinstance(error, RunInterrupted):
        interrupted_epoch = run.epoch
        if error.args and error.args[0] == SAMPLING:
            run.epoch -= 1
            if run.epoch == 0:
                return RunInterrupted("interrupted while sampling epoch 1; no epoch finished, nothing to resume",
                                      report=report)
            path = checkpoint_path(run.run_dir, run.epoch)
            if not path.is_dir():
                path = save_checkpoint(run)
            return RunInterrupted(f"interrupted while sampling epoch {interrupted_epoch}; checkpoint {path} holds "
                                  f"the state after epoch {run.epoch}; {resume} (it continues exactly)", report=report)
        run.guard.stopped_mid_epoch = True
        path = save_checkpoint(run)
        return RunInterrupted(f"interrupted during the update of epoch {interrupted_epoch}; saved the state after "
                              f"the current optimizer step in {path}; {resume} (from epoch {interrupted_epoch + 1})",
                              report=report)
    if isinstance(error, KeyboardInterrupt):
        saved = list_checkpoints(run.run_dir)
        newest = f"the newest complete checkpoint is {saved[-1]}; {resume}" if saved else "no checkpoint was saved"
        return RunInterrupted(f"stopped at once during epoch {run.epoch}; {newest}", report=report)
    return error
