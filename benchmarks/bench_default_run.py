"""The embedded default (`ddpo run` with no flags): wall time and reward curve.

Runs the default in a temporary log directory (extra arguments are passed on to `ddpo run`) and prints the
wall time, the time per epoch, the reward of the first and last epochs, and the first epoch whose mean
reward reached 0.7. The target of the default: from about 0.1 to at least 0.7 within 5 minutes on 2 CPU cores.

    python benchmarks/bench_default_run.py [extra ddpo run arguments]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    with tempfile.TemporaryDirectory() as logdir:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ddpo", "run", "--logdir", logdir, "--run-name", "bench",
                        *sys.argv[1:]], check=True)
        wall = time.perf_counter() - started
        lines = (Path(logdir) / "bench" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    rewards = [record["reward/mean"] for record in records]
    reached = next((record["epoch"] for record in records if record["reward/mean"] >= 0.7), None)
    epoch_seconds = [record["perf/epoch_seconds"] for record in records]
    print(f"wall time (incl. start-up)  {wall:.1f} s for {len(records)} epochs")
    print(f"epoch time                  {sum(epoch_seconds) / len(epoch_seconds):.2f} s mean, "
          f"{max(epoch_seconds):.2f} s max")
    print(f"samples per second          {records[-1]['perf/samples_per_second']:.1f}")
    print(f"peak memory                 {max(record['perf/peak_memory_mb'] for record in records):.0f} MB")
    print(f"reward first / last epoch   {rewards[0]:.3f} / {rewards[-1]:.3f}")
    print(f"first epoch with reward>=0.7 {reached} (reward queries "
          f"{records[reached - 1]['reward_queries'] if reached else '-'})")
    print("curve                       " + " ".join(f"{reward:.2f}" for reward in rewards))


if __name__ == "__main__":
    main()
