"""The names of a run directory (DESIGN.md §6), in one module that imports nothing heavy, so that the CLI
(`ddpo sweep`, `ddpo compare`, `ddpo sample --checkpoint`) reads them from the same place as the trainer
without importing torch.

    RUN_DIR/config.yaml                  the resolved run config
    RUN_DIR/metrics.jsonl                one JSON record per epoch
    RUN_DIR/checkpoints/epoch_NNNN/      a complete checkpoint (ddpo.core.engine.checkpoint)
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^epoch_(\d{4,})$")
"""A complete checkpoint's directory name; one being written is `epoch_NNNN.partial`."""


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"epoch_{epoch:04d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    directory = Path(run_dir) / CHECKPOINTS
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and _CHECKPOINT_NAME.match(path.name)]
    return sorted(found, key=lambda path: int(_CHECKPOINT_NAME.match(path.name).group(1)))
