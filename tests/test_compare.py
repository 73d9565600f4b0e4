"""Comparing algorithms: `ddpo sweep` (real `ddpo run` subprocesses), `ddpo compare` (TensorBoard's reader,
metrics.jsonl, foreign logs, seeds grouped, matplotlib chart), presets, and the fixed evaluation images."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from conftest import run_cli
from ddpo.analysis.compare import figure, load_groups, summarize, table
from ddpo.core.configuration.config import resolve_config
from ddpo.core.configuration.errors import UsageError
from ddpo.core.plugin_api.registry import get_registry

TINY = ["--reward", "digit", "--set", "reward.target=3", "--set", "sample.batches_per_epoch=1",
        "--set", "sample.num_steps=4", "--epochs", "2"]
SHIPPED_PRESETS = ["ddpo-aesthetic-sd14", "ddpo-compressibility-sd14", "ddpo-alignment-sd14", "dpok-sd15", "d3po-sd15",
                   "tdpo-r-aesthetic-sd14", "flow-grpo-sd35", "rwr-compressibility-sd14",
                   "rwr-sparse-compressibility-sd14", "rwr-aesthetic-sd14"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sweep_reports_a_failed_run_skips_finished_runs_and_resumes_unfinished_ones(tmp_path):
    # 12 images per batch suit ddpo-is but not grpo's groups of 8: grpo fails (for both seeds), the sweep goes on.
    args = ["sweep", "--algo", "ddpo-is,grpo", "--seeds", "0,1", "--logdir", str(tmp_path / "runs"), *TINY,
            "--set", "sample.batch_size=12", "--set", "train.batch_size=12"]
    first = run_cli(*args)
    assert first.returncode == 1, first.stdout + first.stderr
    lines = {line.split()[1]: line for line in first.stdout.splitlines() if line.startswith("[")}
    assert set(lines) == {"ddpo-is__s0", "ddpo-is__s1", "grpo__s0", "grpo__s1"}
    assert "done, started (2 epochs" in lines["ddpo-is__s0"] and "done, started" in lines["ddpo-is__s1"]
    assert "FAILED (exit 2" in lines["grpo__s1"] and "must be a multiple of algorithm 'grpo' group size 8" in lines[
        "grpo__s1"]
    assert "2 of 4 runs failed" in first.stderr
    finished = tmp_path / "runs" / "ddpo-is__s1"
    assert [record["epoch"] for record in metrics(finished)] == [1, 2]

    # Interrupt ddpo-is__s1 during its epoch 2 (its last checkpoint is epoch 1), and sweep again.
    import shutil

    shutil.rmtree(finished / "checkpoints" / "epoch_0002")
    uninterrupted = metrics(finished)
    (finished / "metrics.jsonl").write_text(json.dumps(uninterrupted[0]) + "\n")
    again = run_cli(*args)
    lines = {line.split()[1]: line for line in again.stdout.splitlines() if line.startswith("[")}
    assert "skipped: finished (2 epochs)" in lines["ddpo-is__s0"]
    assert "done, resumed (2 epochs" in lines["ddpo-is__s1"]
    assert "FAILED" in lines["grpo__s0"] and again.returncode == 1
    resumed = metrics(finished)
    assert [record["epoch"] for record in resumed] == [1, 2]
    assert resumed[1]["reward/mean"] == pytest.approx(uninterrupted[1]["reward/mean"], rel=1e-5)
    assert "--resume" in (finished / "run.log").read_text()

    # The two seeds of ddpo-is are one group; the failed grpo runs have no scalars and are not runs.
    compared = run_cli("compare", str(tmp_path / "runs"), "--json", "--target", "0")
    assert compared.returncode == 0, compared.stderr
    (group,) = json.loads(compared.stdout)["groups"]
    assert group["algorithm"] == "ddpo-is" and sorted(group["runs"]) == ["ddpo-is__s0", "ddpo-is__s1"]
    stats = group["tags"]["reward/mean"]
    assert stats["seeds"] == 2 and stats["reward_queries"] == 24 and stats["to_target"]["mean"] == 12
    assert stats["curve"]["reward_queries"] == [12, 24]


def test_ctrl_c_stops_the_sweep_after_the_running_runs_checkpoint_and_starts_no_other(tmp_path):
    """A real SIGINT to the sweep alone, once its first run has a checkpoint: the run stops as `ddpo run` does
    (exit 130, a checkpoint), it is reported as interrupted and not failed, the next run never starts, and the
    sweep exits with 130 saying how to continue."""
    logdir = tmp_path / "runs"
    args = [sys.executable, "-m", "ddpo", "sweep", "--algo", "ddpo-is", "--seeds", "0,1", "--logdir", str(logdir),
            *TINY, "--epochs", "50"]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = logdir / "ddpo-is__s0" / "checkpoints"
    deadline = time.monotonic() + 300
    # Any checkpoint: with epochs this short, keep_checkpoints=3 may delete epoch_0001 before a poll sees it.
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint while the sweep ran"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stdout + stderr
    lines = {line.split()[1]: line for line in stdout.splitlines() if line.startswith("[")}
    assert "interrupted" in lines["ddpo-is__s0"] and "--resume" in lines["ddpo-is__s0"], lines
    assert "not started" in lines["ddpo-is__s1"] and not (logdir / "ddpo-is__s1").exists(), lines
    assert "FAILED" not in stdout and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last == ("ddpo: error: sweep interrupted: 0 of 2 runs finished, 1 interrupted, 1 not started; run the same "
                    "command again to continue them"), last
    assert any(checkpoints.iterdir())
    assert "interrupted" in (logdir / "ddpo-is__s0" / "run.log").read_text()


def test_fixed_evaluation_images_leave_the_training_run_unchanged(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator

    from ddpo.core.engine.trainer import train

    sets = ["reward.target=3", "sample.batch_size=8", "sample.batches_per_epoch=1", "sample.num_steps=4",
            "train.batch_size=8"]
    flags = {"reward": {"name": "digit"}, "epochs": 2, "logdir": str(tmp_path), "device": "cpu"}
    train(resolve_config(None, sets, {**flags, "run_name": "plain"}))
    train(resolve_config(None, [*sets, "eval.num_steps=3", "eval.rewards=[legibility]"],
                         {**flags, "run_name": "evaluated"}))
    for without, with_eval in zip(metrics(tmp_path / "plain"), metrics(tmp_path / "evaluated"), strict=True):
        assert {tag: value for tag, value in with_eval.items() if tag in without and not tag.startswith("perf/")} == \
               {tag: value for tag, value in without.items() if not tag.startswith("perf/")}
        assert {"eval/digit/mean", "eval/legibility/mean"} <= set(with_eval)
    run_dir = tmp_path / "evaluated"
    assert sorted(path.name for path in (run_dir / "eval").iterdir()) == ["base_features.safetensors", "epoch_0001.png",
                                                                           "epoch_0002.png"]
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.IMAGES: 0,
                                                                             event_accumulator.TENSORS: 0})
    events.Reload()
    assert [image.step for image in events.Images("eval/images")] == [8, 16]
    captions = events.Tensors("eval/captions/text_summary")
    text = captions[-1].tensor_proto.string_val[0].decode()
    assert [caption.step for caption in captions] == [8, 16]
    assert "| image | prompt | digit | legibility |" in text and text.count("(unconditional)") == 8


def write_run(directory, algorithm, seed, rewards, **config_changes):
    """A ddpo-style run directory (config.yaml + metrics.jsonl), 64 reward queries per epoch."""
    directory.mkdir(parents=True)
    config = {"seed": seed, "run_name": directory.name, "logdir": str(directory.parent), "epochs": len(rewards),
              "algorithm": {"name": algorithm}, "reward": {"name": "digit"}, "model": {"name": "digits"},
              **config_changes}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": epoch, "reward_queries": 64 * epoch, "reward/mean": reward,
                    "eval/legibility/mean": 1 - reward / 2, "perf/epoch_seconds": 10.0}) + "\n"
        for epoch, reward in enumerate(rewards, start=1)))


@pytest.fixture
def logdir(tmp_path):
    write_run(tmp_path / "a0", "ddpo-is", 0, [0.1, 0.3, 0.5])
    write_run(tmp_path / "a1", "ddpo-is", 1, [0.1, 0.5, 0.7])
    write_run(tmp_path / "b0", "rwr", 0, [0.2, 0.2, 0.3])
    write_run(tmp_path / "c0", "rwr", 0, [0.0, 0.1, 0.1], train={"learning_rate": 1e-3})
    return tmp_path


def test_compare_groups_seeds_and_tabulates_mean_and_std(logdir):
    groups = load_groups(logdir, ["reward/mean"])
    assert [group.label for group in groups] == ["ddpo-is / digit / digits",
                                                 "rwr / digit / digits (train.learning_rate=0.001)",
                                                 "rwr / digit / digits (train.learning_rate=None)"]
    summary = summarize(groups, ["reward/mean"], target=0.5)["groups"][0]
    stats = summary["tags"]["reward/mean"]
    assert stats["last"] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.1)}
    assert stats["best"]["mean"] == pytest.approx(0.6) and stats["first"]["std"] == 0
    assert stats["to_target"] == {"mean": 160.0, "reached": 2, "seeds": 2}  # 192 (seed 0) and 128 (seed 1)
    assert stats["curve"]["mean"] == pytest.approx([0.1, 0.4, 0.6])
    assert summary["wall_seconds"]["mean"] == 30.0
    text = table(groups, ["reward/mean"], target=0.5)
    header, first_row = text.splitlines()[:2]
    assert "last eval/legibility/mean" in header and "queries to 0.5" in header
    assert first_row.split()[:5] == ["ddpo-is", "digit", "digits", "2", "192"]
    assert "0.6 ± 0.1" in first_row and "0.7 ± 0.05" in first_row and "30 s" in first_row
    assert "-" == text.splitlines()[-1].split()[-1]  # rwr with lr 1e-3 never reached 0.5


def test_compare_reads_a_foreign_tensorboard_log_by_tag(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for seed in (0, 1):
        with SummaryWriter(str(tmp_path / f"ppo_seed{seed}")) as writer:
            for step in range(1, 4):
                writer.add_scalar("charts/episodic_return", step * (seed + 1), global_step=step * 1000)
    tags = ["charts/episodic_return"]
    (group,) = summarize(load_groups(tmp_path, tags), tags, target=None)["groups"]
    assert group["label"] == "ppo" and group["tags"]["charts/episodic_return"]["last"]["mean"] == 4.5
    assert group["tags"]["charts/episodic_return"]["curve"]["reward_queries"] == [1000, 2000, 3000]
    with pytest.raises(UsageError, match="no run under .* logged tag 'reward/mean'; tags there: charts/episodic_return"):
        load_groups(tmp_path, ["reward/mean"])


def test_chart_has_a_panel_per_tag_and_distinct_tick_labels_at_any_scale(tmp_path):
    for seed in (0, 1):
        directory = tmp_path / f"r{seed}"
        directory.mkdir()
        (directory / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": epoch, "reward_queries": 250_000 * epoch,
                        "reward/mean": 0.5 + 1e-5 * epoch + 1e-6 * seed, "eval/legibility/mean": 900.0 + epoch})
            + "\n" for epoch in range(1, 9)))
    tags = ["reward/mean", "eval/legibility/mean"]
    fig = figure(load_groups(tmp_path, tags), tags)
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == tags
    for ax in panels:
        for axis in (ax.xaxis, ax.yaxis):
            labels = [label.get_text() for label in axis.get_ticklabels() if label.get_text()]
            assert len(labels) == len(set(labels)) >= 3, labels
    assert panels[0].get_xlabel() == "step"  # no config.yaml: not known to be reward queries


def test_chart_without_matplotlib_is_a_usage_error(logdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UsageError, match=r"pip install 'ddpo\[plot\]'"):
        figure(load_groups(logdir, ["reward/mean"]), ["reward/mean"])


@pytest.mark.parametrize("name", SHIPPED_PRESETS)
def test_each_shipped_preset_resolves_to_a_valid_config(name):
    preset = get_registry().presets[name]
    config = resolve_config(preset=name)
    assert config.algorithm.name == preset.config["algorithm"]["name"]
    assert preset.info.gpus >= 1 and preset.info.paper
    assert "Source:" in preset.path.read_text()  # every preset says where its numbers come from


def test_flags_and_set_override_a_preset():
    result = run_cli("config", "--preset", "ddpo-aesthetic-sd14", "--epochs", "7", "--set", "train.learning_rate=1e-4")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert config["epochs"] == 7 and config["train"]["learning_rate"] == 1e-4
    assert config["train"]["grad_accum"] == 4 and config["reward"]["name"] == "aesthetic"  # the rest is the preset's
    with pytest.raises(UsageError, match="unknown preset 'ddpo-aesthetic'"):
        resolve_config(preset="ddpo-aesthetic")


def test_a_third_party_plugin_registers_a_preset(tmp_path):
    package = tmp_path / "lab_presets"
    package.mkdir()
    (package / "tiny-digits.yaml").write_text(textwrap.dedent("""
        preset: {paper: "Our lab's notes", gpus: 2, description: "Digits, quickly"}
        epochs: 3
        algorithm: {name: rwr, temperature: 0.5}
    """))
    (package / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        import ddpo

        @ddpo.hookimpl
        def register_presets(register):
            register(Path(__file__).parent / "tiny-digits.yaml")
    """))
    info = tmp_path / "lab_presets-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-presets\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ddpo]\nlab = lab_presets\n")
    env = {"PYTHONPATH": str(tmp_path)}
    listing = run_cli("list", "presets", env=env)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if "tiny-digits" in line)
    assert "2 GPUs" in row and "Our lab's notes" in row
    assert all(name in listing.stdout for name in SHIPPED_PRESETS)
    config = yaml.safe_load(run_cli("config", "--preset", "tiny-digits", "--set", "algorithm.temperature=2",
                                    env=env).stdout)
    assert config["epochs"] == 3 and config["algorithm"]["name"] == "rwr" and config["algorithm"]["temperature"] == 2.0


def test_the_cli_does_not_import_matplotlib_or_tensorboard_until_compare_draws():
    probe = textwrap.dedent("""
        import sys
        from ddpo.cli import main
        for argv in (["--help"], ["list"], ["list", "presets"], ["sweep", "--help"], ["compare", "--help"]):
            try:
                main(argv)
            except SystemExit as exit:
                assert exit.code in (0, None), (argv, exit.code)
        print("HEAVY", sorted(name for name in ("torch", "matplotlib", "tensorboard") if name in sys.modules))
    """)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
