"""Sharded training through accelerate's launcher with the config files ddpo ships (src/ddpo/accelerate_configs):
`ddpo run --distributed fsdp|zero2|zero3 [--num-processes N]` on one machine, and `ddpo launch-config NAME`,
the path of a config file for `accelerate launch --config_file` (several machines, SLURM)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ddpo.core.configuration.errors import UsageError

CONFIGS = {"fsdp": "FSDP2: weights, gradients and optimizer state sharded",
           "zero2": "DeepSpeed ZeRO-2: gradients and optimizer state sharded (needs deepspeed)",
           "zero3": "DeepSpeed ZeRO-3: weights, gradients and optimizer state sharded (needs deepspeed)"}
LAUNCHED = ("LOCAL_RANK", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
"""Variables a launcher sets in the processes it starts."""


def config_path(name: str) -> Path:
    """The shipped accelerate config file `name` (a key of CONFIGS), or a usage error listing them."""
    if name not in CONFIGS:
        raise UsageError(f"unknown distributed setting '{name}'; valid: {', '.join(CONFIGS)}")
    return Path(__file__).resolve().parent.parent / "accelerate_configs" / f"{name}.yaml"


def run_argv(set_: list[str] | None, profile: bool, **flags: Any) -> list[str]:
    """`ddpo run` arguments that repeat the given flags (for a launcher to pass on)."""
    argv = ["run"]
    for name, value in flags.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for assignment in set_ or []:
        argv += ["--set", assignment]
    return argv + (["--profile"] if profile else [])


def launch_argv(name: str, num_processes: int | None, mixed_precision: str, ddpo_args: list[str]) -> list[str]:
    """The command line that runs `ddpo ARGS` under `accelerate launch` with the shipped config `name` on this
    machine, `num_processes` processes (default: one per visible GPU) and a free rendezvous port (two launches on
    one machine do not meet)."""
    path = config_path(name)
    if any(variable in os.environ for variable in LAUNCHED):
        raise UsageError("--distributed starts its own launcher; inside `accelerate launch` or torchrun, "
                         "leave --distributed out")
    if name.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise UsageError(f"--distributed {name} needs DeepSpeed: pip install --no-build-isolation deepspeed "
                         "(or use --distributed fsdp)")
    if num_processes is None:
        import torch

        num_processes = torch.cuda.device_count()
        if num_processes == 0:
            raise UsageError("--distributed found no GPU to start a process on; give --num-processes N "
                             "(CPU processes, with --device cpu)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
            "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", mixed_precision,
            "--main_process_port", str(port), "-m", "ddpo", *ddpo_args]


def register(app: typer.Typer) -> None:
    @app.command("launch-config")
    def launch_config(name: Annotated[str, typer.Argument(help=f"One of: {', '.join(CONFIGS)}.")]):
        """Print the path of an accelerate config file ddpo ships, for
        `accelerate launch --config_file PATH -m ddpo run ...` (several machines: add --num_machines,
        --machine_rank, --main_process_ip)."""
        typer.echo(str(config_path(name)))
