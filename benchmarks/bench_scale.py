"""How epoch time scales on the shipped digits model: 1 and 2 CPU processes (accelerate launch --multi_gpu
--device cpu, as tests/test_distributed.py), samples per epoch, and denoising steps.

Each configuration is a real `ddpo run` of `--epochs` epochs; the figure is `perf/epoch_seconds` of its
fastest epoch after the first (read from metrics.jsonl). With 2 processes each takes the per-process batch,
so an epoch holds twice the samples: compare seconds per sample.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import cpu_model

BASE = {"sample.batch_size": 8, "sample.batches_per_epoch": 2, "sample.num_steps": 10, "train.batch_size": 8,
        "train.grad_accum": 1}


def epoch_seconds(logdir: Path, name: str, settings: dict, epochs: int, processes: int) -> float:
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]
    ddpo = ["-m", "ddpo", "run", *sets, "--epochs", str(epochs), "--logdir", str(logdir), "--run-name", name,
            "--device", "cpu"]
    launcher = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                 str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, *ddpo], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{name} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (logdir / name / "metrics.jsonl").read_text().splitlines()]
    return min(record["perf/epoch_seconds"] for record in records[1:] or records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"digits model, base: {BASE}; fastest epoch after the first of {args.epochs}\n")
    with tempfile.TemporaryDirectory() as scratch:
        logdir = Path(scratch)
        for processes in (1, 2):
            seconds = epoch_seconds(logdir, f"p{processes}", BASE, args.epochs, processes)
            samples = 16 * processes
            print(f"{processes} process(es): {seconds:6.2f} s/epoch, {samples} samples, "
                  f"{1000 * seconds / samples:6.1f} ms/sample")
        base = None
        for batches in (1, 2, 4):
            seconds = epoch_seconds(logdir, f"b{batches}", {**BASE, "sample.batches_per_epoch": batches},
                                    args.epochs, 1)
            base = base or seconds
            print(f"{8 * batches:3d} samples/epoch: {seconds:6.2f} s/epoch  ({seconds / base:.2f}x the 8-sample epoch)")
        base = None
        for steps in (5, 10, 20):
            seconds = epoch_seconds(logdir, f"s{steps}", {**BASE, "sample.num_steps": steps}, args.epochs, 1)
            base = base or seconds
            print(f"{steps:3d} steps:          {seconds:6.2f} s/epoch  ({seconds / base:.2f}x the 5-step epoch)")


if __name__ == "__main__":
    main()
