"""Throughput and latency of `ddpo serve-reward` on loopback, with request batching on and off.

The server runs as its own process (`ddpo serve-reward REWARD --device cpu --port 0`), so that its event loop and
scoring thread do not share an interpreter with the clients; `--clients` threads here each send `--requests`
requests of `--images` images through the `remote` reward, all at once. Batching on is the default window and
batch size (0.05 s, 64 images), and the same window with `--max-batch` equal to the images all clients send at
once; off is `--batch-window 0 --max-batch 1` (one request per scoring call).

    OMP_NUM_THREADS=1 python benchmarks/bench_reward_server.py [--reward digit] [--clients 8] [--requests 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import torch

from ddpo.plugins.rewards.remote import Remote
from machine import cpu_model



def settings(args) -> dict[str, list[str]]:
    """Server flags by label: the defaults; max-batch equal to what all clients send at once (a full batch is
    scored without waiting out the window); batching off."""
    return {"on (defaults)": ["--batch-window", "0.05", "--max-batch", "64"],
            "on (max fits)": ["--batch-window", "0.05", "--max-batch", str(args.clients * args.images)],
            "off": ["--batch-window", "0", "--max-batch", "1"]}


def measure(args, server_flags: list[str]) -> tuple[float, list[float]]:
    """(wall seconds for every request, each request's latency in seconds) against a fresh server."""
    server = subprocess.Popen([sys.executable, "-m", "ddpo", "serve-reward", args.reward, "--device", "cpu",
                               "--port", "0", *server_flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        url = server.stdout.readline().split()[-1]  # "serving reward 'NAME' on http://127.0.0.1:PORT"
        Remote({"url": url, "timeout": 600}).load(None)
        images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        latencies: list[float] = []
        start = threading.Barrier(args.clients + 1)

        def client() -> None:
            remote = Remote({"url": url, "timeout": 600, "image_format": args.image_format})
            start.wait()
            for _ in range(args.requests):
                sent = time.perf_counter()
                remote(images, ["a prompt"] * args.images, [{}] * args.images)
                latencies.append(time.perf_counter() - sent)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - began, latencies
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward", default="digit", help="reward plugin to serve")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--image-format", choices=["png", "raw"], default="png")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    print(f"python {platform.python_version()}; reward {args.reward}; {args.clients} clients x {args.requests} "
          f"requests x {args.images} images of {args.size}x{args.size} as {args.image_format}\n")
    for label, flags in settings(args).items():
        seconds, latencies = measure(args, flags)
        percentiles = statistics.quantiles(latencies, n=20)
        print(f"batching {label:<14} {len(latencies) / seconds:7.1f} requests/s "
              f"{len(latencies) * args.images / seconds:8.1f} images/s  latency p50 "
              f"{statistics.median(latencies) * 1000:7.1f} ms  p95 {percentiles[18] * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
