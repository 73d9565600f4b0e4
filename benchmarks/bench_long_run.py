"""No leaks under long runs: 200 epochs of the digits task at tiny settings, memory and disk.

Runs `ddpo run` (default algorithm and reward, 8 samples of 4 steps per epoch) with a small plugin that
records the process's resident memory after every epoch, then prints the resident and peak RSS at epochs 10,
100 and 200 (a leak shows as growth between 100 and 200), and the disk use of the checkpoints with the
default keep_checkpoints=3 (it must not grow with the epochs) next to the rest of the run directory.

    python benchmarks/bench_long_run.py [--epochs 200] [extra ddpo run arguments]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

PLUGIN = '''
import json, os, resource

import ddpo


@ddpo.hookimpl
def on_epoch_end(run, epoch, metrics):
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(os.environ["BENCH_MEMORY_LOG"], "a") as log:
        log.write(json.dumps({"epoch": epoch, "rss_mb": resident, "peak_rss_mb": peak}) + "\\n")
'''
TINY = ["--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
        "--set", "train.batch_size=8", "--set", "train.grad_accum=1"]


def disk_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**20


def main() -> None:
    args = sys.argv[1:]
    epochs = 200
    if "--epochs" in args:
        epochs = int(args[args.index("--epochs") + 1])
        del args[args.index("--epochs"):args.index("--epochs") + 2]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "bench_memory_probe.py").write_text(PLUGIN)
        info = work / "bench_memory_probe-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench-memory-probe\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[ddpo]\nbench_memory_probe = bench_memory_probe\n")
        log = work / "memory.jsonl"
        env = {**os.environ, "PYTHONPATH": str(work), "BENCH_MEMORY_LOG": str(log)}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ddpo", "run", *TINY, "--epochs", str(epochs), "--logdir",
                        str(work / "runs"), "--run-name", "long", *args], check=True, env=env,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        memory = {record["epoch"]: record for record in map(json.loads, log.read_text().splitlines())}
        run_dir = work / "runs" / "long"
        checkpoints = sorted((run_dir / "checkpoints").iterdir())
        checkpoint_mb = disk_mb(run_dir / "checkpoints")
        samples_mb = disk_mb(run_dir / "samples")
        events_mb = sum(file.stat().st_size for file in run_dir.glob("events.out.tfevents.*")) / 2**20

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"{epochs} epochs in {wall:.0f} s (incl. start-up)")
    for epoch in (10, 100, 200):
        if epoch in memory:
            record = memory[epoch]
            print(f"epoch {epoch:>3}: resident {record['rss_mb']:.0f} MB, peak {record['peak_rss_mb']:.0f} MB")
    print(f"checkpoints kept: {len(checkpoints)} ({', '.join(path.name for path in checkpoints)}), "
          f"{checkpoint_mb:.2f} MB ({checkpoint_mb / len(checkpoints):.2f} MB each)")
    print(f"rest of the run directory: samples/ {samples_mb:.2f} MB, TensorBoard events {events_mb:.2f} MB")


if __name__ == "__main__":
    main()
