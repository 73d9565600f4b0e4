"""`ddpo sweep`: every (algorithm, seed) combination as its own `ddpo run`, into one log directory.

Each combination is a real `ddpo run` subprocess named `{algo}__s{seed}`, so a sweep's runs are exactly the
runs a user would start by hand, and one crashing run cannot take the others down: it is reported with its
last error line and the sweep goes on (exit code 1 at the end). Starting the same sweep again skips the runs
whose last epoch is on disk (its checkpoint and its metrics line) and continues the others with `--resume`;
a run that died before its first checkpoint starts over. Each run's output goes to `{run_dir}/run.log`.

Ctrl-C reaches the sweep alone (each run has its own session) and the sweep hands it on, once per Ctrl-C, to
the runs in progress: they stop the way `ddpo run` does (after the current optimizer step, with a checkpoint;
a second Ctrl-C at once), no further run starts, and the sweep exits with 130. The interrupted runs are not
failures: the same command continues them.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from ddpo.cli.flags import config_layer
from ddpo.core.configuration.config import resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CONFIG_FILE, METRICS_FILE, checkpoint_path, list_checkpoints
from ddpo.core.configuration.preflight import check_output_directory
from ddpo.core.engine.guards import INTERRUPTED_EXIT_CODE, RunInterrupted

LOG_FILE = "run.log"


@dataclass
class SweepRun:
    """One combination of the sweep."""

    algo: str
    seed: int
    run_dir: Path
    epochs: int | None
    """The epochs the run trains to, from its resolved config; None if the config does not resolve (the run
    is still started, so that it fails with `ddpo run`'s own message)."""

    @property
    def name(self) -> str:
        return self.run_dir.name


def run_name(algo: str, seed: int) -> str:
    return f"{algo}__s{seed}"


def parse_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag} expects a comma-separated list, got '{text}'")
    return items


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in parse_list(text, "--seeds")]
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers (e.g. 0,1,2), got '{text}'") from None


def last_metrics(run_dir: Path) -> dict | None:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def is_finished(run: SweepRun) -> bool:
    """The run's last epoch is on disk: its checkpoint and its metrics line."""
    if run.epochs is None:
        return False
    record = last_metrics(run.run_dir)
    return (record is not None and record["epoch"] >= run.epochs
            and checkpoint_path(run.run_dir, run.epochs).is_dir())


def last_error_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ddpo: error:") or "Error" in line]
    return (errors or lines or ["(no output)"])[-1]


class Sweep:
    """The combinations, the `ddpo run` arguments they share, and the progress lines."""

    def __init__(self, runs: list[SweepRun], shared_args: list[str]):
        self.runs = runs
        self.shared_args = shared_args
        self.lock = threading.Lock()
        self.done = 0
        self.interrupted = threading.Event()
        self.processes: set[subprocess.Popen] = set()

    def report(self, run: SweepRun, message: str) -> None:
        with self.lock:
            self.done += 1
            typer.echo(f"[{self.done}/{len(self.runs)}] {run.name:<24} {message}")

    def command(self, run: SweepRun) -> tuple[list[str], str]:
        """The `ddpo run` command line for a run, and what it does (start, resume, restart)."""
        command = [sys.executable, "-m", "ddpo", "run", "--algo", run.algo, "--seed", str(run.seed), *self.shared_args]
        if list_checkpoints(run.run_dir) and (run.run_dir / CONFIG_FILE).is_file():
            return [*command, "--resume", str(run.run_dir)], "resumed"
        action = "started"
        if (run.run_dir / CONFIG_FILE).exists():  # died before its first checkpoint: nothing to resume
            shutil.rmtree(run.run_dir)
            action = "restarted"
        return [*command, "--logdir", str(run.run_dir.parent), "--run-name", run.name], action

    def execute(self, run: SweepRun) -> str:
        """Run one combination (unless finished or the sweep was interrupted) and report it: "finished",
        "failed", "interrupted" or "not started"."""
        if is_finished(run):
            self.report(run, f"skipped: finished ({run.epochs} epochs)")
            return "finished"
        process = None
        started = time.perf_counter()
        with self.lock:  # so that an interrupt either comes first or sees the process
            if not self.interrupted.is_set():
                command, action = self.command(run)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                log = run.run_dir / LOG_FILE
                with log.open("a") as stream:
                    stream.write(f"$ {' '.join(command)}\n")
                    stream.flush()
                    process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
                self.processes.add(process)
        if process is None:
            self.report(run, "not started: the sweep was interrupted")
            return "not started"
        returncode = process.wait()
        with self.lock:
            self.processes.discard(process)
        seconds = time.perf_counter() - started
        if returncode == INTERRUPTED_EXIT_CODE:
            self.interrupted.set()
            self.report(run, f"interrupted ({seconds:.0f} s): {last_error_line(log)}")
            return "interrupted"
        if returncode != 0:
            self.report(run, f"FAILED (exit {returncode}, {seconds:.0f} s): {last_error_line(log)}  [log: {log}]")
            return "failed"
        record = last_metrics(run.run_dir) or {}
        summary = f"reward/mean {record['reward/mean']:.4g}" if "reward/mean" in record else ""
        self.report(run, f"done, {action} ({record.get('epoch', '?')} epochs, {seconds:.0f} s) {summary}".rstrip())
        return "finished"

    def interrupt(self) -> None:
        """Ctrl-C: start no further run, and hand the SIGINT on to the runs in progress."""
        with self.lock:
            self.interrupted.set()
            for process in self.processes:
                process.send_signal(signal.SIGINT)

    def execute_all(self, jobs: int) -> list[str]:
        """Run every combination, `jobs` at once; returns each one's outcome (see `execute`).

        The sweep's own SIGINT handler calls `interrupt`, as `ddpo run` installs its own: Python's default one
        is missing when SIGINT came in ignored (a job started with `&` by a script), and it raises
        KeyboardInterrupt, which could arise inside the pool's locking. The main thread polls in short sleeps
        so that the handler runs within 0.2 s whichever thread the kernel gave the signal to."""
        previous = signal.signal(signal.SIGINT, lambda signum, frame: self.interrupt())
        try:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(self.execute, run) for run in self.runs]
                while not all(future.done() for future in futures):
                    time.sleep(0.2)
        finally:
            signal.signal(signal.SIGINT, previous)
        return [future.result() for future in futures]


def register(app: typer.Typer) -> None:
    @app.command()
    def sweep(
        algo: Annotated[str, typer.Option("--algo", help="Comma-separated algorithms, e.g. ddpo-is,rwr,grpo.")],
        seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds, e.g. 0,1,2.")] = "0",
        reward: Annotated[str | None, typer.Option("--reward", help="Training reward plugin name.")] = None,
        model: Annotated[str | None, typer.Option("--model", help="Model plugin name.")] = None,
        preset: Annotated[str | None, typer.Option("--preset", help="A preset (ddpo list presets).")] = None,
        config: Annotated[Path | None, typer.Option("--config", help="YAML or TOML config file.")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE config override, repeatable; "
                                                       "applies to every run.")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs to train.")] = None,
        logdir: Annotated[str | None, typer.Option("--logdir", help="Directory of the sweep's run "
                                                   "directories (default: the config's logdir).")] = None,
        device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
        jobs: Annotated[int, typer.Option("--jobs", min=1, help="Runs at once.")] = 1,
    ):
        """Run every algorithm x seed combination, each a `ddpo run` named {algo}__s{seed}, into one log
        directory; run it again to skip finished runs and resume unfinished ones."""
        algos, seed_values = parse_list(algo, "--algo"), parse_seeds(seeds)
        shared: list[str] = []
        for flag, value in (("--reward", reward), ("--model", model), ("--preset", preset), ("--config", config),
                            ("--epochs", epochs), ("--device", device)):
            if value is not None:
                shared += [flag, str(value)]
        for assignment in set_ or []:
            shared += ["--set", assignment]
        runs = []
        for name in algos:
            for seed in seed_values:
                try:
                    flags = config_layer(name, reward, model, seed=seed, epochs=epochs, logdir=logdir, device=device)
                    resolved = resolve_config(config, set_ or [], flags, preset=preset)
                    run_logdir, run_epochs = resolved.logdir, resolved.epochs
                except UsageError:
                    run_logdir, run_epochs = logdir or "runs", None
                runs.append(SweepRun(name, seed, Path(run_logdir) / run_name(name, seed), run_epochs))
        for sweep_logdir in dict.fromkeys(run.run_dir.parent for run in runs):
            check_output_directory(sweep_logdir, "log directory", "give --logdir a directory you can write to")
        typer.echo(f"sweep: {len(algos)} algorithms x {len(seed_values)} seeds = {len(runs)} runs into "
                   f"{runs[0].run_dir.parent}, {jobs} at a time")
        outcomes = Sweep(runs, shared).execute_all(jobs)
        failed = outcomes.count("failed")
        if failed:
            typer.echo(f"sweep: {failed} of {len(runs)} runs failed", err=True)
        if "interrupted" in outcomes or "not started" in outcomes:
            raise RunInterrupted(f"sweep interrupted: {outcomes.count('finished')} of {len(runs)} runs finished, "
                                 f"{outcomes.count('interrupted')} interrupted, {outcomes.count('not started')} not "
                                 f"started; run the same command again to continue them")
        if failed:
            raise typer.Exit(1)
        typer.echo(f"sweep: all {len(runs)} runs finished; compare them with: ddpo compare {runs[0].run_dir.parent}")

