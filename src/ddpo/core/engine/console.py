"""What a run prints while it trains. On a terminal, progress bars; when stderr is not a terminal (CI logs,
`nohup`, a cluster job) the bars are off, so each epoch ends with one plain line instead."""

from __future__ import annotations

import sys
from typing import Any

SHOWN_TAGS = ("reward/mean",)
SHOWN_PREFIXES = ("loss/",)


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """`epoch 3/10 reward/mean=0.512 loss/policy=-0.0123 ... 12.3s` from an epoch's metrics record."""
    shown = [tag for tag in record if tag in SHOWN_TAGS or tag.startswith(SHOWN_PREFIXES)]
    values = " ".join(f"{tag}={record[tag]:.4g}" for tag in shown)
    return f"epoch {record['epoch']}/{epochs} {values} {record.get('perf/epoch_seconds', 0.0):.1f}s"


def report_epoch(record: dict[str, Any], epochs: int) -> None:
    """Print the epoch's line on stderr when stderr is not a terminal."""
    if not sys.stderr.isatty():
        print(epoch_line(record, epochs), file=sys.stderr, flush=True)
