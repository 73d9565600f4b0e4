"""Helpers the test modules share: reading a run's metrics, plugin distributions on disk, two-process launches on
a free port, products made once per session whatever the xdist worker, the learning runs of the slow tier with their
shuffled-reward control, and `ddpo` commands run one after the other in one fresh process (commands that must stop
before anything loads)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

SHUFFLE_ENV = "DDPO_TEST_SHUFFLE_REWARDS"
"""Set to 1 in a command's environment to make the `shuffled_rewards` plugin (conftest's `forked_cli` has it on
its path) permute each epoch's rewards among the samples before advantages are computed."""

SHUFFLED_REWARDS_PLUGIN = f'''
"""The control of a learning test: the rewards of each epoch permuted among its samples (seeded by run seed and
epoch), so that the update no longer knows which sample earned which reward. The logged reward statistics keep
their values (a permutation has the same mean), and an algorithm that learns from its rewards must stop learning."""
import os

import torch

import ddpo


@ddpo.hookimpl
def on_rollout_end(run, trajectory):
    if os.environ.get("{SHUFFLE_ENV}") != "1":
        return
    generator = torch.Generator().manual_seed(run.config.seed * 1000 + run.epoch)
    order = torch.randperm(trajectory.batch_size, generator=generator)
    trajectory.rewards = trajectory.rewards[order.to(trajectory.rewards.device)]
'''


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def make_distribution(directory: Path, module: str, source: str) -> Path:
    """A plugin distribution on disk: `module`.py with `source` and its dist-info naming it in the `ddpo`
    entry-point group. Put `directory` on PYTHONPATH to install it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(source)
    info = directory / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ddpo]\n{module} = {module}\n")
    return directory


def free_port() -> int:
    """A TCP port no process listens on now: each launch gets its own rendezvous port, so launches that run at
    once (two in one test, or tests on other workers) do not fight over accelerate's default 29500."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_launch(*ddpo_args: str) -> list[str]:
    """The command line of `accelerate launch` running `ddpo ARGS` on two CPU processes (gloo) on a free port.
    accelerate's own --cpu flag starts one process; --multi_gpu starts torchrun, and `--device cpu` keeps every
    process on the CPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", "ddpo", *ddpo_args, "--device", "cpu"]


def once_per_session(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The directory `name` that `make(directory)` has filled, made once per test session even when pytest-xdist
    hands the tests that need it to several workers (the suite's `--dist worksteal` splits a module's tests
    between workers, and a module- or session-scoped fixture runs once in each worker that uses it). The first
    worker to ask makes it, in the session's directory all workers share, under a file lock; the others wait
    and get the same directory. A `make` that raised leaves no product: the next worker to ask makes it again,
    from an empty directory."""
    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: its own temporary directory
        directory = tmp_path_factory.mktemp(name)
        make(directory)
        return directory
    shared = tmp_path_factory.getbasetemp().parent  # the session's directory, parent of each worker's own
    directory, made = shared / name, shared / f"{name}.made"
    with FileLock(shared / f"{name}.lock"):
        if not made.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            made.touch()
    return directory


def learning_command(cli, tmp_path: Path, algorithm: str, target: int, seed: int, epochs: int, *sets: str,
                     shuffled: bool = False) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`ddpo run --algo ALGORITHM` on the embedded digits task towards `target` with legibility evaluated, through
    `cli` (conftest's `forked_cli`); with `shuffled`, the control run whose rewards are permuted among the samples.
    Returns the command's result and each epoch's metrics; the run directory is `tmp_path / learning_name(...)`."""
    name = learning_name(algorithm, target, seed, shuffled)
    extra = [argument for assignment in sets for argument in ("--set", assignment)]
    result = cli.run("run", "--algo", algorithm, "--epochs", str(epochs), "--seed", str(seed),
                     "--set", f"reward.target={target}", "--set", "eval.rewards=[legibility]", *extra,
                     "--logdir", str(tmp_path), "--run-name", name, env={SHUFFLE_ENV: "1"} if shuffled else None)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, read_metrics(tmp_path / name)


def learning_run(cli, tmp_path: Path, algorithm: str, target: int, seed: int, epochs: int, *sets: str,
                 shuffled: bool = False) -> list[dict]:
    """Each epoch's metrics of `learning_command`'s run."""
    return learning_command(cli, tmp_path, algorithm, target, seed, epochs, *sets, shuffled=shuffled)[1]


def learning_name(algorithm: str, target: int, seed: int, shuffled: bool = False) -> str:
    """The run's directory under the log directory."""
    return f"{algorithm}-t{target}-s{seed}{'-shuffled' if shuffled else ''}"


def reward_rise(records: list[dict]) -> float:
    """The learning tests' measure (and benchmarks/bench_learning_tests.py's): the mean reward of the last two
    epochs minus the first epoch's, which samples the base model."""
    rewards = [record["reward/mean"] for record in records]
    return (rewards[-1] + rewards[-2]) / 2 - rewards[0]


def learning_cases(pairs: list[tuple[int, int]], control: tuple[int, int]) -> list:
    """pytest parameters (target, seed, shuffled) of a learning test: each pair learning, then the control pair with
    shuffled rewards; one test case per run, so that xdist spreads them over its workers."""
    import pytest

    return [pytest.param(target, seed, False, id=f"t{target}-s{seed}") for target, seed in pairs] + [
        pytest.param(*control, True, id=f"t{control[0]}-s{control[1]}-shuffled")]


def assert_learned(records: list[dict], shuffled: bool, threshold: float, min_legibility: float) -> None:
    """A learning run's reward rose by more than `threshold` and its samples stayed digits (every epoch's
    legibility above `min_legibility`); a control run's (`shuffled`) rose by less than `threshold`."""
    rewards = [round(record["reward/mean"], 3) for record in records]
    if shuffled:
        assert reward_rise(records) < threshold, rewards
        return
    assert reward_rise(records) > threshold, rewards
    legibility = [round(record["eval/legibility/mean"], 3) for record in records]
    assert min(legibility) > min_legibility, legibility


CLI_CASES = r'''
"""Run the `ddpo` command line (ddpo.cli.main, the console script) for each case of the JSON list in argv[1],
{"argv", "watch"}, one after the other in this process, and print a JSON object: each case's exit code, stdout,
stderr and the paths it created or removed under "watch"; and which heavy modules were imported by the end."""
import contextlib
import io
import json
import os
import sys

from ddpo.cli import main


def tree(root):
    return {os.path.join(folder, name) for folder, folders, files in os.walk(root) for name in folders + files}


cases = []
for case in json.loads(sys.argv[1]):
    before, stdout, stderr = tree(case["watch"]), io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main(case["argv"])
            code = 0
        except SystemExit as exit:
            code = exit.code
    cases.append({"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(),
                  "changed": sorted(tree(case["watch"]) ^ before)})
heavy = [name for name in ("torch", "diffusers", "accelerate", "transformers") if name in sys.modules]
print(json.dumps({"cases": cases, "heavy": heavy}))
'''


def cli_cases_in_one_process(argvs: list[list[str]], watch: Path, launcher: list[str] = ()) -> tuple[list[dict], list]:
    """Run each `ddpo ARGV` in one fresh interpreter (started by `launcher` if given, e.g. in a namespace), noting
    what each changed under `watch`. Commands that stop before loading anything cost milliseconds each this way, and
    the heavy modules imported by the end show that none loaded. Returns each command's {"code", "stdout",
    "stderr", "changed"} and the heavy modules imported."""
    cases = json.dumps([{"argv": argv, "watch": str(watch)} for argv in argvs])
    result = subprocess.run([*launcher, sys.executable, "-c", CLI_CASES, cases], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and not result.stderr, result.stderr[-3000:]
    report = json.loads(result.stdout)
    return report["cases"], report["heavy"]


def flow_scheduler(steps: int = 10):
    """diffusers' flow-matching Euler scheduler with SD3's shift 3, set to `steps` steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler


def velocity_inputs(seed: int = 0):
    """(velocity, sample), each (3, 4, 8, 8) standard normal, for one flow step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)


def lora_b_norm(checkpoint):
    """The summed absolute value of the LoRA up-projections (B, zero at initialisation) in a checkpoint."""
    from safetensors.torch import load_file

    return sum(float(value.abs().sum()) for key, value in load_file(checkpoint / "weights.safetensors").items()
               if "lora_B" in key)
