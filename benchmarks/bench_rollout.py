"""Rollout throughput and reward/sampling overlap on the shipped digits model.

Samples a few batches with a reward that takes a fixed time per batch (like a reward model or a remote
scorer), then prints how long sampling and scoring took, the wall time of the rollout, and how much of the
reward time was hidden behind the sampling of the next batch.

    python benchmarks/bench_rollout.py [--batches 4] [--batch-size 32] [--steps 20] [--reward-seconds 0.5]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import ddpo
from ddpo.core.configuration.config import SampleConfig
from ddpo.core.engine.rollout import RolloutEngine
from ddpo.plugins.models.digits import Digits
from ddpo.plugins.prompts import Unconditional
from ddpo.plugins.rewards.digit import Digit


class TimedDigit(ddpo.Reward):
    """The digit reward plus a fixed latency per batch."""

    name = "timed-digit"

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds
        self.inner = Digit()

    def load(self, device):
        self.inner.load(device)

    def __call__(self, images, prompts, metadata):
        time.sleep(self.seconds)
        return self.inner(images, prompts, metadata)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reward-seconds", type=float, default=0.5)
    args = parser.parse_args()

    model = Digits()
    model.load(torch.device("cpu"), torch.float32)
    reward = TimedDigit(args.reward_seconds)
    reward.load(torch.device("cpu"))
    config = SampleConfig(batch_size=args.batch_size, batches_per_epoch=args.batches, num_steps=args.steps,
                          eta=1.0, guidance_scale=1.0)
    engine = RolloutEngine(model, reward, Unconditional(), config)
    engine.collect(torch.Generator().manual_seed(0), random.Random(0))  # warm-up
    started = time.perf_counter()
    trajectory, _ = engine.collect(torch.Generator().manual_seed(1), random.Random(1))
    wall = time.perf_counter() - started
    engine.close()

    sampling = sum(end - start for kind, _, start, end in engine.timeline if kind == "sample")
    scoring = sum(end - start for kind, _, start, end in engine.timeline if kind == "reward")
    samples = trajectory.batch_size
    print(f"samples                 {samples} ({args.batches} batches x {args.batch_size}, {args.steps} steps)")
    print(f"sampling time           {sampling:.2f} s  ({samples / sampling:.1f} samples/s)")
    print(f"reward time             {scoring:.2f} s  ({args.reward_seconds:.2f} s latency per batch)")
    print(f"rollout wall time       {wall:.2f} s  (serial would be {sampling + scoring:.2f} s)")
    print(f"reward time overlapped  {sampling + scoring - wall:.2f} s of {scoring:.2f} s "
          f"({100 * (sampling + scoring - wall) / scoring:.0f}%)")
    print(f"mean reward             {trajectory.rewards.mean().item():.3f}")


if __name__ == "__main__":
    main()
