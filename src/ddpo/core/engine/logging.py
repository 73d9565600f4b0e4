"""Run logging: TensorBoard events and metrics.jsonl in the run directory (DESIGN.md §6).

The x-axis of every TensorBoard scalar is `reward_queries`, the cumulative number of images scored by the
training reward over all processes, so runs with different batch settings line up. Only the main process
writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from ddpo.core.configuration.layout import METRICS_FILE


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} as {"a.b": 1}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class RunLogger:
    """Writes one TensorBoard event stream and one JSON line per epoch."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)
        self.metrics_path = self.run_dir / METRICS_FILE

    def log_hparams(self, config: dict[str, Any], metric_tags: list[str]) -> None:
        """The run's config as TensorBoard hparams, in the same event stream as the scalars."""
        hparam_values = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                         for key, value in flatten(config).items()}
        for summary in hparams(hparam_values, {tag: 0.0 for tag in metric_tags}):
            self.writer.file_writer.add_summary(summary)

    def log_epoch(self, epoch: int, reward_queries: int, scalars: dict[str, float],
                  histograms: dict[str, torch.Tensor], grid: torch.Tensor | None = None,
                  animation: torch.Tensor | None = None) -> dict[str, Any]:
        """Log one epoch at step = reward_queries (`grid` (3, H, W) as the image `samples`, a video model's
        `animation` (F, 3, H, W) as the animated image `samples/video`); returns the JSON record written to
        metrics.jsonl."""
        record: dict[str, Any] = {"epoch": epoch, "reward_queries": reward_queries}
        for tag, value in scalars.items():
            record[tag] = float(value)
            self.writer.add_scalar(tag, float(value), global_step=reward_queries)
        for tag, values in histograms.items():
            self.writer.add_histogram(tag, values.detach().float().cpu(), global_step=reward_queries)
        if grid is not None:
            self.writer.add_image("samples", grid, global_step=reward_queries)
        if animation is not None:
            add_animation(self.writer, "samples/video", animation, reward_queries)
        self.writer.flush()
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        return record

    def close(self) -> None:
        self.writer.close()


def add_animation(writer: SummaryWriter, tag: str, frames: torch.Tensor, step: int) -> None:
    """Log frames (F, 3, H, W) in [0, 1] as an animated GIF image: the summary `SummaryWriter.add_video` writes,
    encoded with PIL instead of moviepy (TensorBoard shows it in the Images tab)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    from ddpo.core.engine.images import gif_bytes

    image = Summary.Image(height=frames.shape[2], width=frames.shape[3], colorspace=frames.shape[1],
                          encoded_image_string=gif_bytes(frames))
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step)


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metrics.jsonl records after `last_epoch` (a resumed run rewrites them)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in kept))
