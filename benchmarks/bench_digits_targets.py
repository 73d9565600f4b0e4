"""The embedded digits demo on every target digit: does `ddpo run --reward digit --set reward.target=T` learn?

Runs `ddpo run` (the `digits` model's defaults, ddpo-is) for each target digit x seed in its own subprocess,
one torch thread each (OMP_NUM_THREADS=1), `--jobs` at a time, with `--set eval.rewards=[legibility]`, and
prints one row per run:

- reward first / last: the mean `digit` reward (probability of the target) of the first and the last epoch;
- reach 0.7: the first epoch whose mean reward reached 0.7 (`-`: never);
- legib: the last epoch's `eval/legibility/mean` (the classifier's highest digit probability, mean over the
  epoch's samples); the base model's value is printed above the table (the bar: base minus 0.05);
- drift: colour drift of the final checkpoint, and the base model's above the table. Drift of an image =
  the mean over its pixels of (|R-G| + |G-B| + |R-B|) / 3, images in [0, 1]; the figure is its mean over
  `--drift-samples` images sampled with the run's sampler from noise seed 0 (the base model draws grey
  digits, about 0.01);
- divers: diversity of the same samples, the per-pixel standard deviation across images, averaged over
  pixels and channels (the base model's is printed above the table; a run collapsed onto one image scores
  near 0);
- seconds: wall time of the `ddpo run` subprocess (one thread, start-up included); cpu s: its CPU time
  (user + system), which stays comparable when the machine is shared.

A summary follows: how many runs reached 0.7 and ended at or above 0.7, the worst final reward, the mean
legibility and drift. The bar of issue 13: every target 0-9, seeds 0-2, at least 0.7 within the default
epoch budget, legibility at least the base's minus 0.05, no colour drift.

    python benchmarks/bench_digits_targets.py                       # 10 targets x seeds 0,1,2, 2 jobs
    python benchmarks/bench_digits_targets.py --targets 3 7 --seeds 0 --epochs 20 \
        --set train.learning_rate=5e-4 --jobs 2 --logdir /tmp/runs --json results.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import cpu_model

REACH = 0.7


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def measure(checkpoint: str, sets: list[str], count: int) -> dict[str, float]:
    """Legibility and colour drift of `count` samples (noise seed 0) of the digits model, base or a checkpoint."""
    import torch

    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.engine.rollout import sample_batch
    from ddpo.core.plugin_api.registry import get_registry
    from ddpo.plugins.rewards.digit_classifier import NUM_DIGITS, digit_probabilities, load_digit_classifier

    config = resolve_config(sets=sets)
    model = get_registry().get("models", config.model.name)(config.model.options())
    model.load(torch.device("cpu"), torch.float32)
    if checkpoint != "base":
        model.configure_training()
        model.load_weights(Path(checkpoint))
    model.denoiser.eval()
    generator = torch.Generator().manual_seed(0)
    images = []
    for start in range(0, count, 64):
        size = min(64, count - start)
        _, batch = sample_batch(model, [""] * size, [{}] * size, num_steps=config.sample.num_steps,
                                eta=config.sample.eta, guidance_scale=config.sample.guidance_scale,
                                generator=generator)
        images.append(batch)
    images = torch.cat(images)
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    drift = (((red - green).abs() + (green - blue).abs() + (red - blue).abs()) / 3).mean(dim=(1, 2)).mean()
    probabilities = digit_probabilities(load_digit_classifier("cpu"), images)[:, :NUM_DIGITS]
    diversity = images.std(dim=0).mean()
    return {"drift": drift.item(), "legibility": probabilities.max(dim=1).values.mean().item(),
            "diversity": diversity.item()}


def measure_in_subprocess(checkpoint: str, sets: list[str], count: int) -> dict[str, float]:
    arguments = [sys.executable, __file__, "--measure", checkpoint, "--drift-samples", str(count)]
    for assignment in sets:
        arguments += ["--set", assignment]
    result = subprocess.run(arguments, env=one_thread_env(), capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_one(target: int, seed: int, args, logdir: Path) -> dict:
    name = f"t{target}_s{seed}"
    command = [sys.executable, "-m", "ddpo", "run", "--reward", "digit", "--seed", str(seed),
               "--set", f"reward.target={target}", "--set", "eval.rewards=[legibility]",
               "--logdir", str(logdir), "--run-name", name]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    for assignment in args.set:
        command += ["--set", assignment]
    log = logdir / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=one_thread_env(), stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    cpu_seconds = usage.ru_utime + usage.ru_stime
    if process.returncode != 0:
        return {"target": target, "seed": seed, "error": log.read_text().strip().splitlines()[-1:],
                "seconds": seconds, "cpu_seconds": cpu_seconds}
    records = [json.loads(line) for line in (logdir / name / "metrics.jsonl").read_text().splitlines()]
    rewards = [record["reward/mean"] for record in records]
    checkpoints = sorted((logdir / name / "checkpoints").glob("epoch_*"))
    final = measure_in_subprocess(str(checkpoints[-1]), args.set, args.drift_samples)
    return {"target": target, "seed": seed, "first": rewards[0], "last": rewards[-1],
            "reach": next((record["epoch"] for record in records if record["reward/mean"] >= REACH), None),
            "legibility": records[-1].get("eval/legibility/mean", float("nan")), "drift": final["drift"],
            "checkpoint_legibility": final["legibility"], "diversity": final["diversity"], "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "curve": rewards,
            "sets": args.set, "epochs": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the digits model's epoch budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra `ddpo run --set` overrides (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each on one thread)")
    parser.add_argument("--drift-samples", type=int, default=256)
    parser.add_argument("--logdir", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="append one JSON line per run to this file")
    parser.add_argument("--curves", action="store_true", help="print each run's reward curve")
    parser.add_argument("--no-base", action="store_true", help="skip measuring the base model")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.set, args.drift_samples)))
        return

    with tempfile.TemporaryDirectory() as temporary:
        logdir = Path(args.logdir or temporary) / ("" if args.logdir else "runs")
        logdir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            base = None if args.no_base else pool.submit(measure_in_subprocess, "base", args.set,
                                                         args.drift_samples)
            futures = [pool.submit(run_one, target, seed, args, logdir)
                       for target in args.targets for seed in args.seeds]
            rows = [future.result() for future in futures]
            base = base.result() if base is not None else None
        wall = time.perf_counter() - started

    if args.json:
        with open(args.json, "a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    print(f"cpu: {cpu_model()}; {os.cpu_count()} cores; {args.jobs} jobs of 1 thread; overrides: "
          f"{' '.join(args.set) or '(none)'}")
    if base is not None:
        print(f"base model: legibility {base['legibility']:.3f}, colour drift {base['drift']:.4f}, "
              f"diversity {base['diversity']:.3f} "
              f"({args.drift_samples} samples, noise seed 0)")
    print(f"{'target':>6} {'seed':>4} {'first':>6} {'last':>6} {'reach0.7':>8} {'legib':>6} {'drift':>7} "
          f"{'divers':>6} {'seconds':>7} {'cpu s':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['target']:>6} {row['seed']:>4}  failed: {row['error']}")
            continue
        reach = str(row["reach"]) if row["reach"] is not None else "-"
        print(f"{row['target']:>6} {row['seed']:>4} {row['first']:6.3f} {row['last']:6.3f} {reach:>8} "
              f"{row['legibility']:6.3f} {row['drift']:7.4f} {row['diversity']:6.3f} {row['seconds']:7.1f} {row['cpu_seconds']:6.1f}")
        if args.curves:
            print("            " + " ".join(f"{reward:.2f}" for reward in row["curve"]))
    done = [row for row in rows if "error" not in row]
    if done:
        reached = sum(row["reach"] is not None for row in done)
        ended = sum(row["last"] >= REACH for row in done)
        print(f"reached {REACH}: {reached}/{len(rows)}; ended >= {REACH}: {ended}/{len(rows)}; "
              f"worst last {min(row['last'] for row in done):.3f}; "
              f"mean legibility {sum(row['legibility'] for row in done) / len(done):.3f} "
              f"(min {min(row['legibility'] for row in done):.3f}); "
              f"mean drift {sum(row['drift'] for row in done) / len(done):.4f} "
              f"(max {max(row['drift'] for row in done):.4f}); wall {wall:.0f} s")


if __name__ == "__main__":
    main()
