"""`ddpo compare`: the runs under a log directory, grouped over seeds, on the reward-queries axis.

Scalars are read from TensorBoard event files with TensorBoard's own reader (so logs written by other tools
work too, by `--tag`), or from `metrics.jsonl` where there are no event files. Runs whose configs differ only
by seed (or, without a config, whose names differ only by a `s0`/`seed0` part) form one group; the table gives
each group's first, last and best value as mean ± std over seeds, the last value of every `eval/*/mean` tag,
the wall time, and the reward queries to reach a target. The chart (matplotlib, the `ddpo[plot]` extra) draws
one line per group with a mean ± std band, one panel per tag. Importing this module imports neither.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddpo.core.configuration.errors import UsageError
from ddpo.core.configuration.layout import CONFIG_FILE, METRICS_FILE

EVENTS_GLOB = "events.out.tfevents.*"
NOT_COMPARED = ("seed", "run_name", "logdir", "device")
"""Config keys that do not make runs different experiments."""
_SEED_PART = re.compile(r"(?:^|[_\-.])+(?:seed|s)[_=\-]?\d+(?=$|[_\-.])")


@dataclass
class RunData:
    """One run's scalar series: tag -> [(step, value)], step = reward queries for ddpo runs."""

    name: str
    config: dict[str, Any] | None
    series: dict[str, list[tuple[int, float]]]
    wall_seconds: float | None


@dataclass
class Stat:
    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0, len(values))

    def __str__(self) -> str:
        return f"{self.mean:.3g} ± {self.std:.2g}"


@dataclass
class Group:
    """Runs that differ only by seed."""

    label: str
    algorithm: str
    reward: str
    model: str
    runs: list[RunData] = field(default_factory=list)

    def values(self, tag: str) -> list[list[tuple[int, float]]]:
        return [run.series[tag] for run in self.runs if run.series.get(tag)]

    def curve(self, tag: str) -> tuple[list[int], list[float], list[float]]:
        """Steps logged by every seed, and the mean and std over seeds there."""
        series = self.values(tag)
        if not series:
            return [], [], []
        common = sorted(set.intersection(*({step for step, _ in points} for points in series)))
        by_step = [dict(points) for points in series]
        stats = [Stat.of([values[step] for values in by_step]) for step in common]
        return common, [stat.mean for stat in stats], [stat.std for stat in stats]

    def summary(self, tag: str, target: float | None) -> dict[str, Any]:
        """first / last / best (the highest; mean ± std over seeds), reward queries, and the queries each seed
        took to reach `target` (mean over the seeds that did)."""
        series = self.values(tag)
        result: dict[str, Any] = {
            "seeds": len(series),
            "reward_queries": max((points[-1][0] for points in series), default=None),
            "first": Stat.of([points[0][1] for points in series]),
            "last": Stat.of([points[-1][1] for points in series]),
            "best": Stat.of([max(value for _, value in points) for points in series]),
        }
        if target is not None:
            reached = [next(step for step, value in points if value >= target) for points in series
                       if any(value >= target for _, value in points)]
            result["to_target"] = {"mean": statistics.fmean(reached) if reached else None, "reached": len(reached),
                                   "seeds": len(series)}
        return result

    def wall(self) -> Stat | None:
        return Stat.of([run.wall_seconds for run in self.runs if run.wall_seconds is not None])


def find_runs(logdir: Path) -> list[Path]:
    """Run directories at or below `logdir`: those holding TensorBoard event files or metrics.jsonl."""
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise UsageError(f"log directory not found: {logdir}")
    found = {path.parent for pattern in (EVENTS_GLOB, METRICS_FILE) for path in logdir.rglob(pattern)}
    if not found:
        raise UsageError(f"no runs under {logdir} (a run directory holds TensorBoard event files or metrics.jsonl)")
    return sorted(found)


def read_events(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], float | None]:
    """Every scalar tag of a directory's event files (all of them, as TensorBoard reads a resumed run), and
    the seconds from the first scalar written to the last."""
    from tensorboard.backend.event_processing import event_accumulator

    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    series, times = {}, []
    for tag in accumulator.Tags()["scalars"]:
        events = accumulator.Scalars(tag)
        series[tag] = sorted((event.step, float(event.value)) for event in events)
        times += [event.wall_time for event in events]
    return series, (max(times) - min(times) if times else None)


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tag of metrics.jsonl, against reward queries."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for tag, value in record.items():
                if tag not in ("epoch", "reward_queries") and isinstance(value, (int, float)):
                    series.setdefault(tag, []).append((record["reward_queries"], float(value)))
    return series


def load_run(run_dir: Path, logdir: Path) -> RunData:
    """A run's scalars; its wall time is the sum of its epochs' perf/epoch_seconds (without a resumed run's
    pause), or else the span of its event times."""
    series, wall = read_events(run_dir) if any(run_dir.glob(EVENTS_GLOB)) else (read_metrics(run_dir), None)
    epoch_seconds = series.get("perf/epoch_seconds")
    if epoch_seconds:
        wall = sum(value for _, value in epoch_seconds)
    config_path = run_dir / CONFIG_FILE
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else None
    name = str(run_dir.relative_to(logdir)) if run_dir != logdir else run_dir.name
    return RunData(name, config, series, wall)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def group_runs(runs: list[RunData]) -> list[Group]:
    """Runs grouped by their config without the seed (or their name without its seed part); labels name the
    algorithm, reward and model, plus the keys that tell groups of the same three apart."""
    keyed: dict[str, list[RunData]] = {}
    for run in runs:
        if run.config is not None:
            key = json.dumps({k: v for k, v in run.config.items() if k not in NOT_COMPARED}, sort_keys=True)
        else:
            key = _SEED_PART.sub("", run.name) or run.name
        keyed.setdefault(key, []).append(run)
    groups = []
    for key, members in keyed.items():
        config = members[0].config
        if config is None:
            groups.append(Group(key, key, "-", "-", members))
        else:
            names = (config["algorithm"]["name"], config["reward"]["name"], config["model"]["name"])
            groups.append(Group(" / ".join(names), *names, members))
    _disambiguate(groups)
    return sorted(groups, key=lambda group: group.label)


def _disambiguate(groups: list[Group]) -> None:
    """Append the differing config keys to labels that would otherwise repeat."""
    by_label: dict[str, list[Group]] = {}
    for group in groups:
        by_label.setdefault(group.label, []).append(group)
    for same in by_label.values():
        if len(same) < 2 or any(group.runs[0].config is None for group in same):
            continue
        flats = [_flat({k: v for k, v in g.runs[0].config.items() if k not in NOT_COMPARED}) for g in same]
        differing = sorted({key for flat in flats for key in flat if any(f.get(key) != flat.get(key) for f in flats)})
        for group, flat in zip(same, flats, strict=True):
            variant = " (" + ", ".join(f"{key}={flat.get(key)}" for key in differing) + ")"
            group.label += variant
            group.algorithm += variant


def load_groups(logdir: Path, tags: list[str]) -> list[Group]:
    """The groups of runs under `logdir` that logged the first of `tags`; a UsageError names the tags there
    are if none did."""
    logdir = Path(logdir)
    runs = [load_run(run_dir, logdir) for run_dir in find_runs(logdir)]
    available = sorted({tag for run in runs for tag in run.series})
    missing = [tag for tag in tags if not any(run.series.get(tag) for run in runs)]
    if missing:
        raise UsageError(f"no run under {logdir} logged tag '{missing[0]}'; tags there: {', '.join(available)}")
    return group_runs([run for run in runs if run.series.get(tags[0])])


def eval_tags(groups: list[Group]) -> list[str]:
    return sorted({tag for group in groups for run in group.runs for tag in run.series
                   if tag.startswith("eval/") and tag.endswith("/mean")})


def summarize(groups: list[Group], tags: list[str], target: float | None) -> dict[str, Any]:
    """Everything the table shows, for `--json`: per group, per tag, the statistics over seeds and the curve."""
    extra = eval_tags(groups)
    result = {"tags": tags, "target": target, "groups": []}
    for group in groups:
        wall = group.wall()
        entry = {"label": group.label, "algorithm": group.algorithm, "reward": group.reward, "model": group.model,
                 "runs": [run.name for run in group.runs], "wall_seconds": _plain(wall), "tags": {}}
        for tag in dict.fromkeys([*tags, *extra]):
            if not group.values(tag):
                continue
            summary = group.summary(tag, target if tag == tags[0] else None)
            steps, mean, std = group.curve(tag)
            entry["tags"][tag] = {**{key: _plain(value) for key, value in summary.items()},
                                  "curve": {"reward_queries": steps, "mean": mean, "std": std}}
        result["groups"].append(entry)
    return result


def _plain(value: Any) -> Any:
    return {"mean": value.mean, "std": value.std} if isinstance(value, Stat) else value


def table(groups: list[Group], tags: list[str], target: float | None = None) -> str:
    """One line per group for the first tag: algorithm, reward, model, seeds, reward queries, first / last / best
    (mean ± std over seeds), each eval/* tag's last value, wall time, and reward queries to reach `target`."""
    tag = tags[0]
    extra = [name for name in eval_tags(groups) if name != tag]
    header = ["algorithm", "reward", "model", "seeds", "queries", f"first {tag}", "last", "best",
              *[f"last {name}" for name in extra], "wall time"]
    if target is not None:
        header.append(f"queries to {target:g}")
    rows = [header]
    for group in groups:
        summary = group.summary(tag, target)
        wall = group.wall()
        row = [group.algorithm, group.reward, group.model, str(summary["seeds"]), str(summary["reward_queries"]),
               str(summary["first"]), str(summary["last"]), str(summary["best"])]
        for name in extra:
            row.append(str(Stat.of([points[-1][1] for points in group.values(name)]) or "-"))
        row.append(f"{wall.mean:.0f} s" if wall else "-")
        if target is not None:
            reached = summary["to_target"]
            row.append("-" if not reached["reached"] else
                       f"{reached['mean']:.0f}" + ("" if reached["reached"] == reached["seeds"]
                                                   else f" ({reached['reached']}/{reached['seeds']} seeds)"))
        rows.append(row)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def figure(groups: list[Group], tags: list[str]):
    """A matplotlib figure: one panel per tag, one line per group (mean over seeds) with a ± std band."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("drawing the chart needs matplotlib: pip install 'ddpo[plot]'") from None
    fig, axes = plt.subplots(1, len(tags), figsize=(6.4 * len(tags), 4.4), squeeze=False, layout="constrained")
    for ax, tag in zip(axes[0], tags, strict=True):
        for index, group in enumerate(groups):
            steps, mean, std = group.curve(tag)
            if not steps:
                continue
            color = f"C{index % 10}"
            seeds = len(group.values(tag))
            ax.plot(steps, mean, color=color, marker="o", markersize=3, label=f"{group.label} ({seeds} seed{'s' if seeds > 1 else ''})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.2, linewidth=0)
        ax.set_title(tag)
        ax.set_xlabel("reward queries" if all(group.runs[0].config for group in groups) else "step")
        ax.set_ylabel(tag)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)) or 1, fontsize="small")
    return fig


def plot(groups: list[Group], tags: list[str], out: Path) -> Path:
    """Draw `figure` into a PNG."""
    fig = figure(groups, tags)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
