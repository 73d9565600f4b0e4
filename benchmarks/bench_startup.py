"""Start-up time of the `ddpo` command: `--help`, `list`, `config`, and how soon `run` and `sample` take their
first sampling step on the shipped digits model.

Each command runs as a fresh process (best of `--repeat`). For `run` and `sample` the process is `ddpo`'s own
entry point with `Model.step` wrapped to print the wall-clock time of its first call, so the figure is "command
typed -> first denoising step done", imports, config resolution and model loading included.

    OMP_NUM_THREADS=1 python benchmarks/bench_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

from machine import cpu_model

FIRST_STEP = "ddpo-bench-first-step"
# Runs the real CLI with Model.step wrapped: the first call prints the wall-clock time it returned at.
ENTRY = f"""
import sys, time
from ddpo.core.plugin_api import model as _model
_step = _model.Model.step
def _timed_step(self, *args, **kwargs):
    result = _step(self, *args, **kwargs)
    if not getattr(_model, "_reported", False):
        _model._reported = True
        print("{FIRST_STEP}", time.time(), file=sys.stderr, flush=True)
    return result
_model.Model.step = _timed_step
from ddpo.cli import main
main(sys.argv[1:])
"""
FLOOR_IMPORTS = "import torch; from diffusers import DDPMPipeline"
TINY_RUN = ["--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
            "--set", "train.batch_size=8", "--epochs", "1"]


def time_command(args: list[str]) -> float:
    """Seconds from spawning `ddpo ARGS` to its exit."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "ddpo", *args], check=True, capture_output=True)
    return time.time() - started


def time_import(statement: str) -> float:
    """Seconds for a fresh interpreter to run `statement` and exit."""
    started = time.time()
    subprocess.run([sys.executable, "-c", statement], check=True, capture_output=True)
    return time.time() - started


def time_first_step(args: list[str]) -> tuple[float, float]:
    """(seconds to the first sampling step, seconds to exit) of `ddpo ARGS`."""
    started = time.time()
    result = subprocess.run([sys.executable, "-c", ENTRY, *args], capture_output=True, text=True)
    ended = time.time()
    if result.returncode:
        raise SystemExit(f"ddpo {' '.join(args)} failed:\n{result.stderr}")
    line = next(line for line in result.stderr.splitlines() if line.startswith(FIRST_STEP))
    return float(line.split()[1]) - started, ended - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per command; the best is reported")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"python {platform.python_version()}; best of {args.repeat} fresh processes\n")
    for label, command in (("ddpo --help", ["--help"]), ("ddpo list", ["list"]), ("ddpo config", ["config"])):
        print(f"{label:<40} {min(time_command(command) for _ in range(args.repeat)):6.2f} s   (target < 1 s)")
    for label, statement in (("floor: " + FLOOR_IMPORTS, FLOOR_IMPORTS),
                             ("the same with gc.disable() first", "import gc; gc.disable(); " + FLOOR_IMPORTS)):
        floor = min(time_import(statement) for _ in range(args.repeat))
        print(f"{label:<40} {floor:6.2f} s   (third-party imports any diffusers model pays; to exit)")
    with tempfile.TemporaryDirectory() as scratch:
        samples = [time_first_step(["sample", "--out", f"{scratch}/grid.png", "--num", "16"])
                   for _ in range(args.repeat)]
        runs = [time_first_step(["run", *TINY_RUN, "--logdir", scratch, "--run-name", f"r{index}"])
                for index in range(args.repeat)]
    for label, timings in (("ddpo sample --num 16", samples), ("ddpo run (digits, 1 tiny epoch)", runs)):
        first, total = min(timings)
        print(f"{label:<40} {first:6.2f} s to the first sampling step (target < 5 s), {total:.2f} s to exit")


if __name__ == "__main__":
    main()
