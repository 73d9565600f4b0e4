"""The figures behind the slow tier's learning tests: for each algorithm, its rise in reward on the digits task over
(target, seed) pairs, their spread, and the same run with the rewards shuffled among the samples (the control).

Each run is `ddpo run --algo A --epochs E --seed S --set reward.target=T --set eval.rewards=[legibility]` in its
own subprocess, one torch thread (OMP_NUM_THREADS=1, as the tests run), `--jobs` at a time. The control runs with
tests/helpers.py's shuffled-rewards plugin on its path. Per run it prints:

- rise: the mean reward of the last two epochs minus the first epoch's (the first epoch samples the base model);
- legib: the lowest `eval/legibility/mean` of any epoch (do the images stay digits?);
- cpu s: the subprocess's CPU time.

Per algorithm it then prints the mean and the standard deviation (population) of the rise over its runs (the
run-to-run spread), the control's rise, and the highest threshold that leaves every run a margin of twice that
spread: min(rise) - 2 x spread. A learning test asserts rise > threshold on three of the pairs, and that the
control stays below it.

    python benchmarks/bench_learning_tests.py --algos ddpo-is rwr --targets 3 7 8 --seeds 0 1 --epochs 8 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import SHUFFLE_ENV, SHUFFLED_REWARDS_PLUGIN, make_distribution, reward_rise  # noqa: E402


def run(algorithm: str, target: int, seed: int, epochs: int, sets: list[str], logdir: Path, plugin: Path,
        shuffled: bool) -> dict:
    name = f"{algorithm}-t{target}-s{seed}{'-shuffled' if shuffled else ''}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(plugin)}
    if shuffled:
        env[SHUFFLE_ENV] = "1"
    command = [sys.executable, "-m", "ddpo", "run", "--algo", algorithm, "--epochs", str(epochs), "--seed", str(seed),
               "--set", f"reward.target={target}", "--set", "eval.rewards=[legibility]",
               *[argument for assignment in sets for argument in ("--set", assignment)],
               "--logdir", str(logdir), "--run-name", name]
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU time, whatever else runs
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            stderr.seek(0)
            raise RuntimeError(f"{name} failed: {stderr.read()[-2000:]}")
    records = [json.loads(line) for line in (logdir / name / "metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward/mean"] for record in records]
    return {"algorithm": algorithm, "target": target, "seed": seed, "shuffled": shuffled, "rewards": rewards,
            "rise": reward_rise(records),
            "legibility": min(record["eval/legibility/mean"] for record in records),
            "legibilities": [record["eval/legibility/mean"] for record in records],
            "cpu_seconds": usage.ru_utime + usage.ru_stime}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algos", nargs="+", required=True)
    parser.add_argument("--targets", nargs="+", type=int, default=[3, 7, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every run")
    parser.add_argument("--control-target", type=int, default=3)
    parser.add_argument("--control-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="append one JSON line per run")
    args = parser.parse_args()

    print(f"CPU: {cpu_model()}, one thread per run, {args.jobs} runs at a time; {args.epochs} epochs")
    with tempfile.TemporaryDirectory() as scratch:
        logdir = Path(scratch)
        plugin = make_distribution(logdir / "plugin", "shuffled_rewards", SHUFFLED_REWARDS_PLUGIN)
        jobs = [(algorithm, target, seed, False) for algorithm in args.algos for target in args.targets
                for seed in args.seeds]
        jobs += [(algorithm, args.control_target, args.control_seed, True) for algorithm in args.algos]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda job: run(job[0], job[1], job[2], args.epochs, args.sets, logdir, plugin,
                                                    job[3]), jobs))
    print(f"{'algorithm':<12}{'target':>7}{'seed':>5}{'control':>8}{'rise':>8}{'legib':>7}{'cpu s':>7}  rewards")
    for result in results:
        control = "yes" if result["shuffled"] else ""
        print(f"{result['algorithm']:<12}{result['target']:>7}{result['seed']:>5}{control:>8}{result['rise']:>8.3f}"
              f"{result['legibility']:>7.3f}{result['cpu_seconds']:>7.0f}  "
              + " ".join(f"{reward:.2f}" for reward in result["rewards"]))
        if args.json:
            with args.json.open("a") as stream:
                stream.write(json.dumps({**result, "epochs": args.epochs, "sets": args.sets}) + "\n")
    print()
    for algorithm in args.algos:
        rises = [result["rise"] for result in results if result["algorithm"] == algorithm and not result["shuffled"]]
        control = next(result["rise"] for result in results if result["algorithm"] == algorithm and result["shuffled"])
        spread = statistics.pstdev(rises)
        print(f"{algorithm:<12} rise {statistics.mean(rises):.3f} ± {spread:.3f} (min {min(rises):.3f}) over "
              f"{len(rises)} runs; control {control:.3f}; threshold with a 2-spread margin: "
              f"{min(rises) - 2 * spread:.3f}")


if __name__ == "__main__":
    main()
