"""`ddpo run --profile`: a torch.profiler trace of one epoch, written into the run directory.

The trainer and the rollout label their phases with `torch.profiler.record_function` (PHASES), so the trace
shows where an epoch's time goes: sampling (the denoising loop), decode, reward (in its worker thread) and
training. Open the JSON in Perfetto (ui.perfetto.dev) or chrome://tracing. The second epoch of the command
is traced (the first pays warm-up: allocator growth, cuDNN autotuning, compilation), or the only one.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

PROFILE_DIR = "profile"
PHASES = {"sampling": "ddpo/sampling", "decode": "ddpo/decode", "reward": "ddpo/reward",
          "training": "ddpo/training"}
"""The record_function label of each phase of an epoch."""


def trace_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / PROFILE_DIR / f"epoch_{epoch:04d}.trace.json"


class EpochProfiler:
    """Profiles the chosen epoch (CPU, and CUDA when available) and exports a chrome trace of it."""

    def __init__(self, run_dir: Path, first_epoch: int, last_epoch: int, enabled: bool):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.profiled_epoch = first_epoch + 1 if last_epoch > first_epoch else first_epoch

    @contextlib.contextmanager
    def epoch(self, epoch: int):
        """Around one epoch: traces it if it is the profiled one."""
        if not self.enabled or epoch != self.profiled_epoch:
            yield
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        all_threads = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)  # the reward workers too
        with torch.profiler.profile(activities=activities, experimental_config=all_threads) as profiler:
            yield
        path = trace_path(self.run_dir, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(path))
        print(f"profile of epoch {epoch}: {path} (open in ui.perfetto.dev)", file=sys.stderr)
