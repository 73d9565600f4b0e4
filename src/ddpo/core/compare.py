"""`ddpo compare`: the runs under a log directory side by side, on the reward-queries axis.

Reads each run's metrics.jsonl and config.yaml (no torch, no TensorBoard needed), prints a table, and can draw
the chosen tag against reward queries as a PNG chart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ddpo.core.errors import UsageError

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class RunCurve:
    name: str
    label: str
    points: list[tuple[int, float]]
    """(reward_queries, value) per epoch that logged the tag."""


def find_runs(logdir: Path) -> list[Path]:
    """Run directories at or below `logdir` (those holding a metrics.jsonl), sorted by path."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise UsageError(f"log directory not found: {logdir}")
    runs = sorted(path.parent for path in logdir.rglob("metrics.jsonl"))
    if not runs:
        raise UsageError(f"no runs under {logdir} (a run directory holds metrics.jsonl)")
    return runs


def load_curves(logdir: Path, tag: str) -> list[RunCurve]:
    """Each run's values of `tag` against reward queries; a UsageError names the tags there are if none has it."""
    curves, tags = [], set()
    for run_dir in find_runs(logdir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        for record in records:
            tags.update(record)
        points = [(record["reward_queries"], record[tag]) for record in records if tag in record]
        config_path = run_dir / "config.yaml"
        label = run_dir.name
        if config_path.is_file():
            config = yaml.safe_load(config_path.read_text())
            label = f"{config['algorithm']['name']} / {config['reward']['name']} / {config['model']['name']}"
        if points:
            curves.append(RunCurve(str(run_dir.relative_to(logdir)) if run_dir != Path(logdir) else run_dir.name,
                                   label, points))
    if not curves:
        valid = sorted(tags - {"epoch", "reward_queries"})
        raise UsageError(f"no run under {logdir} logged tag '{tag}'; tags there: {', '.join(valid)}")
    return curves


def table(curves: list[RunCurve], tag: str) -> str:
    """One line per run: name, what it trained, epochs, reward queries, first / last / best value of the tag."""
    width = max(len(curve.name) for curve in curves)
    lines = [f"{'run':<{width}}  {'algorithm / reward / model':<40} {'epochs':>6} {'queries':>8} "
             f"{'first':>10} {'last':>10} {'best':>10}   ({tag})"]
    for curve in curves:
        values = [value for _, value in curve.points]
        lines.append(f"{curve.name:<{width}}  {curve.label:<40} {len(values):>6} {curve.points[-1][0]:>8} "
                     f"{values[0]:>10.4g} {values[-1]:>10.4g} {max(values):>10.4g}")
    return "\n".join(lines)


def plot(curves: list[RunCurve], tag: str, out: Path, size: tuple[int, int] = (900, 560)) -> Path:
    """Draw every curve (tag against reward queries) with a legend into a PNG."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 30, 50 + 16 * len(curves)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = [x for curve in curves for x, _ in curve.points]
    ys = [y for curve in curves for _, y in curve.points]
    x_low, x_high = 0, max(xs) or 1
    y_low, y_high = min(ys), max(ys)
    if y_high == y_low:
        y_low, y_high = y_low - 1, y_high + 1

    def to_pixel(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        y_value = y_low + fraction * (y_high - y_low)
        _, y_pixel = to_pixel(x_low, y_value)
        draw.line([left - 4, y_pixel, left, y_pixel], fill="black")
        draw.text((4, y_pixel - 6), f"{y_value:.4g}", fill="black")
        x_value = x_low + fraction * (x_high - x_low)
        x_pixel, _ = to_pixel(x_value, y_low)
        draw.line([x_pixel, height - bottom, x_pixel, height - bottom + 4], fill="black")
        draw.text((x_pixel - 12, height - bottom + 6), f"{x_value:.0f}", fill="black")
    draw.text((left, 8), f"{tag} vs reward queries", fill="black")
    for index, curve in enumerate(curves):
        color = PALETTE[index % len(PALETTE)]
        pixels = [to_pixel(x, y) for x, y in curve.points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for x_pixel, y_pixel in pixels:
            draw.ellipse([x_pixel - 2, y_pixel - 2, x_pixel + 2, y_pixel + 2], fill=color)
        legend_y = height - bottom + 26 + 16 * index
        draw.line([left, legend_y + 6, left + 20, legend_y + 6], fill=color, width=3)
        draw.text((left + 26, legend_y), f"{curve.name}  ({curve.label})", fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
