"""What the CLI's commands share: their typer flags, the config layer the named flags make, a checkpoint's run
config, and the reward server's defaults. Command modules import from here, never from each other, and nothing
here imports torch (`ddpo --help` and `ddpo list` stay fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CONFIG_FILE

AlgoFlag = Annotated[str | None, typer.Option("--algo", help="Algorithm plugin name (ddpo list algorithms).")]
RewardFlag = Annotated[str | None, typer.Option("--reward", help="Training reward plugin name.")]
ModelFlag = Annotated[str | None, typer.Option("--model", help="Model plugin name.")]
ConfigFlag = Annotated[Path | None, typer.Option("--config", help="YAML or TOML config file.")]
SetFlag = Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE config override, repeatable "
                                                   "(e.g. --set train.learning_rate=1e-4 --set reward.target=3).")]
EpochsFlag = Annotated[int | None, typer.Option("--epochs", help="Epochs to train.")]
SeedFlag = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
DeviceFlag = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or mps.")]
PresetFlag = Annotated[str | None, typer.Option("--preset", help="A paper's recipe (ddpo list presets); "
                                                "--config, --set and flags override it.")]


def config_layer(algo=None, reward=None, model=None, **top_level: Any) -> dict[str, Any]:
    """Named flags as a config layer."""
    flags: dict[str, Any] = {key: value for key, value in top_level.items() if value is not None}
    for section, name in (("algorithm", algo), ("reward", reward), ("model", model)):
        if name is not None:
            flags[section] = {"name": name}
    return flags


def checkpoint_config(checkpoint: Path | None) -> dict[str, Any] | None:
    """The saved config of the run a checkpoint directory (RUN/checkpoints/epoch_NNNN) belongs to, if any."""
    if checkpoint is None:
        return None
    if not checkpoint.is_dir():
        raise UsageError(f"checkpoint directory not found: {checkpoint}")
    run_config = checkpoint.parent.parent / CONFIG_FILE
    return yaml.safe_load(run_config.read_text()) if run_config.is_file() else None


DEFAULT_HOST = "127.0.0.1"
MEBIBYTE = 1 << 20
DEFAULT_MAX_REQUEST_MB = 512
"""Largest reward-server request body by default: about 30 raw float32 images at 1024x1024, or 120 at 512x512
(PNG is ~10x smaller)."""
