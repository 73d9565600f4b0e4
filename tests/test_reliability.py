"""Reliability (issue 12): exact resume after SIGKILL for every algorithm, Ctrl-C, the numerical guards,
lifecycle hooks that are told when a run fails, one line per epoch without a terminal, and bad input that
stops before any weights load.

Most runs here are real `ddpo run` processes forked from one warm parent that has already imported torch and
diffusers (`cli_server`): each is the CLI's own `main(argv)` in a fresh process, killed or exiting as one
would, without paying ~10 s of imports each. The Ctrl-C test uses a plain `python -m ddpo` subprocess.
Faults are injected by a test plugin loaded through the entry-point mechanism (`probe_plugin`).
"""

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpo.core.configuration.errors import UsageError

from helpers import cli_cases_in_one_process, make_distribution, read_metrics
from conftest import run_cli
from forked_cli import CliServer

TINY = ["--set", "sample.batch_size=8", "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=4",
        "--set", "train.batch_size=4", "--set", "train.grad_accum=1", "--set", "keep_checkpoints=0"]
EPOCH_1_HOOKS = ["rollout 1", "rewards 1 8", "epoch 1", "checkpoint 1 complete"]
"""What the probe plugin logs for a whole epoch of 8 samples: every lifecycle hook, in order."""

PROBE = '''
"""Faults on demand, by environment variable (comma-separated epochs): PROBE_KILL_AT (SIGKILL itself after
sampling), PROBE_KILL_LOGGED_AT (SIGKILL after the epoch was logged, before its checkpoint), PROBE_SIGINT_AT
(one SIGINT after sampling), PROBE_SIGINT_SAMPLING_AT (one SIGINT while the `interrupting` reward scores the
epoch's first batch, the next batch sampling), PROBE_DOUBLE_SIGINT_AT (two), PROBE_NAN_AT (NaN advantages), PROBE_SPIKE_AT
(advantages x 1e4), PROBE_CRASH_AT (raise in on_epoch_end). PROBE_LOG: a file every lifecycle hook appends
to. PROBE_ADVANTAGES: log the largest |advantage| the update saw as probe/max_abs_advantage (editing
on_update_end's metrics). And three broken rewards."""
import os
import signal

import ddpo


def _at(variable, epoch):
    return str(epoch) in os.environ.get(variable, "").split(",")


def _log(*words):
    if os.environ.get("PROBE_LOG"):
        with open(os.environ["PROBE_LOG"], "a") as stream:
            stream.write(" ".join(str(word) for word in words) + "\\n")


_run = []


@ddpo.hookimpl
def on_run_start(run):
    _log("start", run.epoch)
    _run[:] = [run]


@ddpo.hookimpl
def on_rollout_end(run, trajectory):
    _log("rollout", run.epoch)
    if _at("PROBE_KILL_AT", run.epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    if _at("PROBE_SIGINT_AT", run.epoch) or _at("PROBE_DOUBLE_SIGINT_AT", run.epoch):
        os.kill(os.getpid(), signal.SIGINT)
    if _at("PROBE_DOUBLE_SIGINT_AT", run.epoch):
        os.kill(os.getpid(), signal.SIGINT)


_epoch_trajectory = []


@ddpo.hookimpl
def on_rewards(run, trajectory):
    _log("rewards", run.epoch, len(run.gathered_rewards))
    _epoch_trajectory[:] = [trajectory]


@ddpo.hookimpl
def on_update_end(run, metrics):
    if os.environ.get("PROBE_ADVANTAGES"):
        metrics["probe/max_abs_advantage"] = float(_epoch_trajectory[0].advantages.abs().max())


@ddpo.hookimpl
def compute_advantages(run, trajectory):
    import torch

    if _at("PROBE_NAN_AT", run.epoch):
        return torch.full((len(trajectory.prompts),), float("nan"))
    if _at("PROBE_SPIKE_AT", run.epoch):
        return run.algorithm.compute_advantages(run, trajectory) * 1e4
    return None


@ddpo.hookimpl
def on_epoch_end(run, epoch, metrics):
    _log("epoch", epoch)
    if _at("PROBE_KILL_LOGGED_AT", epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    if _at("PROBE_CRASH_AT", epoch):
        raise RuntimeError("probe crash")


@ddpo.hookimpl
def on_checkpoint(run, path):
    _log("checkpoint", run.epoch, "complete" if (path / "trainer.json").is_file() else "incomplete")


@ddpo.hookimpl
def on_exception(run, exception):
    _log("exception", type(exception).__name__)


@ddpo.hookimpl
def on_run_end(run):
    _log("end", run.epoch)


class WrongShape(ddpo.Reward):
    name = "wrong-shape"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(2, 3))


class NotANumber(ddpo.Reward):
    name = "not-a-number"

    def __call__(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)) * float("nan")


class Raising(ddpo.Reward):
    name = "raising"

    def __call__(self, images, prompts, metadata):
        raise ValueError("the scorer is not configured")


class Interrupting(ddpo.Reward):
    """Mean brightness; sends its process a SIGINT when it scores the first batch of a PROBE_SIGINT_SAMPLING_AT
    epoch."""
    name = "interrupting"

    def __init__(self, options=None):
        super().__init__(options)
        self.interrupted = set()

    def __call__(self, images, prompts, metadata):
        epoch = _run[0].epoch if _run else 0
        if _at("PROBE_SIGINT_SAMPLING_AT", epoch) and epoch not in self.interrupted:
            self.interrupted.add(epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return images.mean(dim=(1, 2, 3))


@ddpo.hookimpl
def register_rewards(register):
    for reward in (WrongShape, NotANumber, Raising, Interrupting):
        register(reward)
'''



@pytest.fixture(scope="module")
def probe_plugin(tmp_path_factory):
    return make_distribution(tmp_path_factory.mktemp("probe"), "reliability_probe", PROBE)


class ProbeCli:
    """The forked CLI with the probe plugin on its path; `run(*argv, **env)` returns (exit code, stderr)."""

    def __init__(self, server: CliServer):
        self.server = server

    def run(self, *argv, **env):
        result = self.server.run(*argv, env=env)
        return result.returncode, result.stderr


@pytest.fixture(scope="module")
def cli_server(probe_plugin, tmp_path_factory):
    server = CliServer(tmp_path_factory.mktemp("jobs"), plugin_path=probe_plugin)
    yield ProbeCli(server)
    server.close()


def comparable(records):
    return [{tag: value for tag, value in record.items() if not tag.startswith("perf/")} for record in records]


def weights_equal(first, second):
    a, b = load_file(first / "weights.safetensors"), load_file(second / "weights.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


# 1. Exact resume after SIGKILL, for every algorithm (each with its own state: critic, value baseline,
# reference policy, pairs, groups).

ALGORITHMS = {
    "ddpo-is": [],
    "ddpo-sf": [],
    "rwr": ["--set", "train.inner_epochs=1"],
    "dpok": ["--set", "algorithm.value_baseline=true", "--set", "algorithm.value_batch_size=8",
             "--set", "algorithm.value_micro_batches=1"],
    "d3po": [],
    "d3po-labels": [],  # human labels of `ddpo pairs export` pairs (made in the test)
    "tdpo-r": ["--set", "algorithm.critic_features=pixels", "--set", "algorithm.reset_every=2"],
    "grpo": ["--set", "algorithm.group_size=4", "--set", "train.ema_decay=0.5"],  # with the weights' average
}


KILLED_AFTER_LOGGING = {"ddpo-is", "dpok", "grpo"}
"""Killed once epoch 2 is in metrics.jsonl and TensorBoard but not checkpointed (the resume rewrites it); the
others are killed after epoch 2's sampling."""


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_sigkill_during_an_epoch_then_resume_equals_the_uninterrupted_run(algorithm, cli_server, tmp_path):
    kill = {"PROBE_KILL_LOGGED_AT" if algorithm in KILLED_AFTER_LOGGING else "PROBE_KILL_AT": "2"}
    extra = ALGORITHMS[algorithm]
    if algorithm == "d3po-labels":
        code, stderr = cli_server.run("pairs", "export", "--out", str(tmp_path / "pairs"), "--num", "4",
                                      "--set", "sample.num_steps=4")
        assert code == 0, stderr[-3000:]
        (tmp_path / "pairs" / "labels.jsonl").write_text("".join(
            json.dumps({"pair": pair, "preferred": pair % 2}) + "\n" for pair in range(4)))
        algorithm, extra = "d3po", ["--set", f"algorithm.labels={tmp_path / 'pairs' / 'labels.jsonl'}"]
    args = ["run", "--algo", algorithm, *TINY, *extra, "--epochs", "3", "--logdir", str(tmp_path)]
    code, stderr = cli_server.run(*args, "--run-name", "straight")
    assert code == 0, stderr[-3000:]
    code, stderr = cli_server.run(*args, "--run-name", "killed", **kill)
    assert code == -signal.SIGKILL, stderr[-3000:]
    killed = tmp_path / "killed"
    assert sorted(path.name for path in (killed / "checkpoints").iterdir()) == ["epoch_0001"]
    assert len(read_metrics(killed)) == (2 if "PROBE_KILL_LOGGED_AT" in kill else 1)
    code, stderr = cli_server.run("run", "--resume", str(killed))
    assert code == 0, stderr[-3000:]

    straight = tmp_path / "straight"
    assert comparable(read_metrics(killed)) == comparable(read_metrics(straight))
    if algorithm == "tdpo-r":  # the reset schedule is part of what resumes: the epoch-2 reset happened
        assert [record["critic/resets"] for record in read_metrics(straight)] == [0.0, 1.0, 1.0]
    events = EventAccumulator(str(killed))  # the resumed run's event file continues the killed one's
    events.Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == [8, 16, 24]
    for epoch in (2, 3):
        name = f"epoch_{epoch:04d}"
        assert weights_equal(killed / "checkpoints" / name, straight / "checkpoints" / name), name
        modules = straight / "checkpoints" / name / "modules"
        for path in modules.glob("*.safetensors") if modules.is_dir() else []:  # value baseline, critic
            ours = load_file(killed / "checkpoints" / name / "modules" / path.name)
            assert all(torch.equal(ours[key], tensor) for key, tensor in load_file(path).items()), path.name


def test_lora_resume_is_exact_and_sample_reads_the_lora_checkpoint(cli_server, tiny_sd, tmp_path):
    args = ["run", "--model", "sd14", "--set", f"model.pretrained={tiny_sd}", "--set", "model.use_lora=true",
            "--reward", "compressibility", "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1",
            "--set", "sample.num_steps=4", "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
            "--set", "train.learning_rate=1e-2", "--epochs", "3", "--logdir", str(tmp_path)]
    code, stderr = cli_server.run(*args, "--run-name", "straight")
    assert code == 0, stderr[-3000:]
    code, stderr = cli_server.run(*args, "--run-name", "killed", PROBE_KILL_AT="2")
    assert code == -signal.SIGKILL, stderr[-3000:]
    code, stderr = cli_server.run("run", "--resume", str(tmp_path / "killed"))
    assert code == 0, stderr[-3000:]
    straight, killed = tmp_path / "straight" / "checkpoints", tmp_path / "killed" / "checkpoints"
    assert comparable(read_metrics(tmp_path / "killed")) == comparable(read_metrics(tmp_path / "straight"))
    assert weights_equal(killed / "epoch_0003", straight / "epoch_0003")
    assert (killed / "epoch_0003" / "lora" / "pytorch_lora_weights.safetensors").is_file()

    sample = ["sample", "--num", "2", "--prompt", "cat", "--seed", "0"]
    code, stderr = cli_server.run(*sample, "--checkpoint", str(killed / "epoch_0003"),
                                  "--out", str(tmp_path / "tuned.png"))
    assert code == 0, stderr[-3000:]
    code, stderr = cli_server.run(*sample, "--model", "sd14", "--set", f"model.pretrained={tiny_sd}",
                                  "--set", "sample.num_steps=4", "--out", str(tmp_path / "base.png"))
    assert code == 0, stderr[-3000:]
    tuned, base = (Image.open(tmp_path / f"{name}.png") for name in ("tuned", "base"))
    assert tuned.size == base.size and tuned.tobytes() != base.tobytes()  # the adapters were applied

    code, stderr = cli_server.run(*sample, "--checkpoint", str(killed / "epoch_0003"), "--set", "model.use_lora=false",
                                  "--out", str(tmp_path / "full.png"))
    assert code == 2 and "checkpoint weights do not match model 'sd14' with use_lora=False" in stderr, stderr[-3000:]
    code, stderr = cli_server.run("run", "--resume", str(tmp_path / "killed"), "--set", "model.use_lora=false")
    assert code == 2 and "'model.use_lora' cannot change when resuming" in stderr, stderr[-3000:]


# 2. Ctrl-C


def test_ctrl_c_saves_a_checkpoint_and_exits_130_with_how_to_resume(tmp_path):
    """A real SIGINT from outside, while the run is in its second epoch (sampling or updating)."""
    args = [sys.executable, "-m", "ddpo", "run", *TINY, "--set", "sample.num_steps=10", "--set",
            "sample.batches_per_epoch=2", "--epochs", "50", "--logdir", str(tmp_path), "--run-name", "stopped"]
    run_dir = tmp_path / "stopped"
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch_0001").is_dir() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ddpo: error: interrupted") and f"ddpo run --resume {run_dir}" in last, last
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"epoch_{epoch:04d}" for epoch in range(1, len(checkpoints) + 1)]  # none partial
    assert f"{run_dir / 'checkpoints' / checkpoints[-1]}" in last and "Traceback" not in stderr


def test_ctrl_c_during_the_update_stops_after_that_optimizer_step(cli_server, tmp_path):
    code, stderr = cli_server.run("run", *TINY, "--epochs", "3", "--logdir", str(tmp_path), "--run-name", "int",
                                  PROBE_SIGINT_AT="2")
    assert code == 130, stderr[-3000:]
    assert "interrupted during the update of epoch 2" in stderr and "--resume" in stderr
    run_dir = tmp_path / "int"
    state = json.loads((run_dir / "checkpoints" / "epoch_0002" / "trainer.json").read_text())
    assert state["guard"]["stopped_mid_epoch"] and state["epoch"] == 2
    records = read_metrics(run_dir)  # epoch 2's row holds what it did: its rewards and its one optimizer step
    assert [record["epoch"] for record in records] == [1, 2] and records[1]["train/interrupted"] == 1.0
    assert records[1]["reward_queries"] == 16 and "train/interrupted" not in records[0]
    assert not weights_equal(run_dir / "checkpoints" / "epoch_0001", run_dir / "checkpoints" / "epoch_0002")
    code, stderr = cli_server.run("run", "--resume", str(run_dir))
    assert code == 0 and "continues with the next epoch" in stderr, stderr[-3000:]
    assert [record["epoch"] for record in read_metrics(run_dir)] == [1, 2, 3]


@pytest.mark.parametrize("phase", ["sampling", "update"])
def test_every_epoch_is_logged_exactly_once_whatever_phase_a_ctrl_c_hit(phase, cli_server, tmp_path):
    """A real SIGINT in epoch 3 of 6 (raised by the process to itself, as a terminal's Ctrl-C arrives), while the
    second sampling batch samples or just before the update, then --resume: metrics.jsonl holds epochs 1-6 once
    each, and TensorBoard's reward curve one point per epoch."""
    signal_at = {"sampling": "PROBE_SIGINT_SAMPLING_AT", "update": "PROBE_SIGINT_AT"}[phase]
    run_dir = tmp_path / phase
    code, stderr = cli_server.run("run", *TINY, "--set", "sample.batches_per_epoch=2", "--set", "sample.batch_size=4",
                                  "--reward", "interrupting", "--epochs", "6", "--logdir", str(tmp_path),
                                  "--run-name", phase, **{signal_at: "3"})
    assert code == 130 and f"interrupted {'while sampling' if phase == 'sampling' else 'during the update of'} " \
        "epoch 3" in stderr, stderr[-3000:]
    code, stderr = cli_server.run("run", "--resume", str(run_dir))
    assert code == 0, stderr[-3000:]
    records = read_metrics(run_dir)
    assert [record["epoch"] for record in records] == [1, 2, 3, 4, 5, 6]
    assert [record["reward_queries"] for record in records] == [8, 16, 24, 32, 40, 48]
    events = EventAccumulator(str(run_dir)).Reload()
    assert [event.step for event in events.Scalars("reward/mean")] == [8, 16, 24, 32, 40, 48]


def test_second_ctrl_c_stops_at_once_and_keeps_the_newest_checkpoint(cli_server, tmp_path):
    log = tmp_path / "hooks.log"
    code, stderr = cli_server.run("run", *TINY, "--epochs", "3", "--logdir", str(tmp_path), "--run-name", "twice",
                                  PROBE_DOUBLE_SIGINT_AT="2", PROBE_LOG=str(log))
    run_dir = tmp_path / "twice"
    assert code == 130, stderr[-3000:]
    assert f"stopped at once during epoch 2; the newest complete checkpoint is {run_dir / 'checkpoints'}" in stderr
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0001"]
    assert log.read_text().splitlines() == ["start 0", *EPOCH_1_HOOKS, "rollout 2", "exception KeyboardInterrupt",
                                            "end 2"]
    code, stderr = cli_server.run("run", "--resume", str(run_dir))
    assert code == 0, stderr[-3000:]


# 6. Lifecycle hooks are paired; 8. one line per epoch without a terminal

def test_a_failing_run_calls_on_exception_then_on_run_end(cli_server, tmp_path):
    log = tmp_path / "hooks.log"
    code, stderr = cli_server.run("run", *TINY, "--epochs", "3", "--logdir", str(tmp_path), "--run-name", "crash",
                                  PROBE_CRASH_AT="2", PROBE_LOG=str(log))
    assert code == 1 and "RuntimeError: probe crash" in stderr, stderr[-3000:]
    assert log.read_text().splitlines() == ["start 0", *EPOCH_1_HOOKS, "rollout 2", "rewards 2 8", "epoch 2",
                                            "exception RuntimeError", "end 2"]


def test_without_a_terminal_each_epoch_prints_one_line(cli_server, tmp_path):
    log = tmp_path / "hooks.log"
    code, stderr = cli_server.run("run", *TINY, "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "lines",
                                  PROBE_LOG=str(log))
    assert code == 0, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("epoch ")]
    records = read_metrics(tmp_path / "lines")
    assert len(lines) == 2
    for line, record in zip(lines, records, strict=True):
        assert line.startswith(f"epoch {record['epoch']}/2 reward/mean={record['reward/mean']:.4g} ")
        assert f"loss/policy={record['loss/policy']:.4g}" in line and line.endswith("s")
    assert log.read_text().splitlines() == ["start 0", *EPOCH_1_HOOKS, "rollout 2", "rewards 2 8", "epoch 2",
                                            "checkpoint 2 complete", "end 2"]  # no exception, one end


# 3. Numerical guards


def test_non_finite_steps_are_skipped_and_a_run_of_them_stops_the_run(cli_server, tmp_path):
    args = ["run", *TINY, "--set", "train.grad_norm_spike_factor=10", "--set", "advantage.clip_max=1e9",
            "--logdir", str(tmp_path)]
    code, stderr = cli_server.run(*args, "--epochs", "6", "--run-name", "skips", PROBE_NAN_AT="5",
                                  PROBE_SPIKE_AT="4")
    assert code == 0, stderr[-3000:]
    assert "skipped an optimizer step: non-finite loss or gradient" in stderr
    records = read_metrics(tmp_path / "skips")
    assert [record["train/skipped_steps"] for record in records] == [0, 0, 0, 0, 2, 0]
    spikes = [record["train/grad_norm_spikes"] for record in records]
    assert spikes[:3] == [0, 0, 0] and spikes[3] >= 1
    checkpoints = tmp_path / "skips" / "checkpoints"
    assert weights_equal(checkpoints / "epoch_0004", checkpoints / "epoch_0005")  # both steps skipped
    assert not weights_equal(checkpoints / "epoch_0005", checkpoints / "epoch_0006")

    code, stderr = cli_server.run(*args, "--set", "train.max_skipped_steps=3", "--epochs", "4", "--run-name", "stop",
                                  PROBE_NAN_AT="2,3")
    assert code == 1, stderr[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss or gradient (train.max_skipped_steps)" in stderr
    run_dir = tmp_path / "stop"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    for name in ("epoch_0001", "epoch_0002"):
        weights = load_file(run_dir / "checkpoints" / name / "weights.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


# 7. Behaviour no other test covered


def test_save_every_keeps_the_last_epoch_and_updates_clip_and_repeat_as_configured(cli_server, tmp_path):
    """save_every=2 of 3 epochs saves epochs 2 and 3 (the last always), keep_checkpoints=0 keeps them all; the
    algorithm's own advantages are clipped to advantage.clip_max; inner_epochs=2 with timestep_fraction=0.5
    makes twice the optimizer steps."""
    code, stderr = cli_server.run("run", *TINY, "--set", "save_every=2", "--set", "advantage.clip_max=0.5",
                                  "--set", "train.inner_epochs=2", "--set", "train.timestep_fraction=0.5",
                                  "--epochs", "3", "--logdir", str(tmp_path), "--run-name", "every",
                                  PROBE_ADVANTAGES="1")
    assert code == 0, stderr[-3000:]
    run_dir = tmp_path / "every"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0002", "epoch_0003"]
    records = read_metrics(run_dir)
    assert [record["probe/max_abs_advantage"] for record in records] == [0.5, 0.5, 0.5]
    assert [record["train/optimizer_steps"] for record in records] == [4.0, 4.0, 4.0]  # 2 x 8 / (4 x 1)


def test_the_file_prompt_set_draws_the_files_lines(tmp_path):
    import random

    from ddpo.core.plugin_api.registry import get_registry

    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\n  a blue ball  \n")
    prompt_set = get_registry().get("prompts", "file")({"path": str(path)})
    drawn = {prompt_set.sample(random.Random(seed))[0] for seed in range(20)}
    assert drawn == {"a red cube", "a blue ball"}


# 4. Bad input: exit 2, one line, nothing written, before any weights load


def assert_usage_error(code, stderr, *fragments):
    assert code == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddpo: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli_server, tmp_path):
    (tmp_path / "a-file").write_text("")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "not-a-run").mkdir()
    no_checkpoint = tmp_path / "no-checkpoint"
    no_checkpoint.mkdir()
    (no_checkpoint / "config.yaml").write_text(run_cli("config").stdout)
    before = sorted(path for path in tmp_path.rglob("*"))
    cases = [
        (["--logdir", str(tmp_path / "a-file" / "runs")], ["cannot create log directory", "is a file"]),
        (["--set", "sample.eta=1.5"], ["sample.eta", "less than or equal to 1"]),
        (["--config", str(tmp_path / "config.json")], ["must end in .yaml, .yml or .toml"]),
        (["--set", "prompts.name=file", "--set", f"prompts.path={tmp_path / 'empty.txt'}"], ["holds no prompts"]),
        (["--resume", str(tmp_path / "not-a-run")], ["is not a run directory"]),
        (["--resume", str(no_checkpoint)], ["no checkpoint to resume"]),
        (["--reward", "wrong-shape"], ["reward 'wrong-shape' (package reliability-probe)", "shape (2, 3)"]),
        (["--reward", "not-a-number"], ["reward 'not-a-number' (package reliability-probe)", "non-finite"]),
        (["--set", "eval.rewards=[raising]"],
         ["reward 'raising' (package reliability-probe)", "ValueError: the scorer is not configured"]),
    ]
    for args, fragments in cases:
        assert_usage_error(*cli_server.run("run", "--logdir", str(tmp_path), *args), *fragments)
    assert sorted(path for path in tmp_path.rglob("*")) == before


WRITTEN_DIRECTORY_ROLES = ("log directory", "log directory", "output directory", "output directory")
"""What the error line calls the directory of each of `writing_commands`."""


def writing_commands(target):
    """The commands that write a directory, each told to write it at `target` (`ddpo sample`: its grid's folder)."""
    return [["run", "--logdir", str(target)], ["sweep", "--algo", "ddpo-is", "--logdir", str(target)],
            ["sample", "--out", str(target / "grid.png")], ["pairs", "export", "--out", str(target)]]


def assert_refused_before_anything_loads(commands, fragments, watched, launcher=()):
    """Each command (run one after the other in one fresh process) exits 2 with one line on stderr holding its
    fragments and nothing on stdout, leaves the tree under `watched` as it was, and none imported torch (or diffusers,
    accelerate, transformers)."""
    results, heavy = cli_cases_in_one_process(commands, watched, launcher)
    assert len(results) == len(commands) == len(fragments)
    for command, expected, result in zip(commands, fragments, results):
        assert_usage_error(result["code"], result["stderr"], *expected)
        assert result["stdout"] == "" and result["changed"] == [], (command, result["stdout"], result["changed"])
    assert heavy == []


def test_an_output_directory_that_cannot_be_created_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """Under a pseudo-filesystem (ENOENT in /proc), a regular file as the directory or its parent, a name over the
    filesystem's limit (ENAMETOOLONG): every command that writes a directory stops before loading anything; so does
    `ddpo sample` whose --out is a directory, or a file name over the limit."""
    proc = Path("/proc/ddpo-cannot-write")
    with pytest.raises(OSError) as refused:
        proc.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    name_max = os.pathconf(tmp_path, "PC_NAME_MAX")
    too_long = tmp_path / ("n" * (name_max + 1))
    cases = [(proc, [f"cannot create {{role}} {proc}: {refused.value.strerror}"]),
             (a_file, [f"{{role}} {a_file} is a file"]),
             (a_file / "runs", [f"cannot create {{role}} {a_file / 'runs'}: {a_file} is a file"]),
             (too_long, [f"cannot create {{role}} {too_long}: {os.strerror(errno.ENAMETOOLONG)}",
                         f"names here are at most {name_max} bytes"])]
    commands, fragments = [], []
    for target, expected in cases:
        commands += writing_commands(target)
        fragments += [[part.format(role=role) for part in expected] for role in WRITTEN_DIRECTORY_ROLES]
    commands.append(["run", "--logdir", str(tmp_path / "runs"), "--run-name", too_long.name])
    fragments.append([f"cannot create run directory {tmp_path / 'runs' / too_long.name}: "
                      f"{os.strerror(errno.ENAMETOOLONG)}", "choose another --run-name"])
    (tmp_path / "folder.png").mkdir()
    commands += [["sample", "--out", str(tmp_path / "folder.png")], ["sample", "--out", str(too_long) + ".png"]]
    fragments += [[f"output file {tmp_path / 'folder.png'} is a directory"],
                  [f"cannot write in output directory {tmp_path}: {os.strerror(errno.ENAMETOOLONG)}",
                   f"at {too_long}.png", f"names here are at most {name_max} bytes"]]
    assert_refused_before_anything_loads(commands, fragments, tmp_path)


def mount_namespace(setup):
    """The launcher of a command in a new user and mount namespace (`unshare -rm`, root there, so it may mount a
    tmpfs) after the shell commands `setup`; the test is skipped where such namespaces are not available."""
    probe = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", tempfile.gettempdir()],
                           capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs a user+mount namespace to mount a tmpfs in (unshare -rm): "
                    + (probe.stderr.strip() if probe is not None else "no unshare command"))
    return ["unshare", "-rm", "sh", "-c", f'{setup} && exec "$@"', "sh"]


def test_a_read_only_or_full_filesystem_is_one_line_exit_2_and_writes_nothing(tmp_path):
    """Real filesystems: a read-only tmpfs (EROFS) and a full one (ENOSPC: it still creates folders and files,
    and refuses their data), mounted in a namespace of the test's own; the resumed run directory is on the
    read-only one."""
    from ddpo.core.configuration.config import resolve_config

    read_only, full = tmp_path / "read-only", tmp_path / "full"
    read_only.mkdir()
    full.mkdir()
    (tmp_path / "config.yaml").write_text(resolve_config(None, [], {}).to_yaml())
    quoted = {name: shlex.quote(str(path)) for name, path in
              (("read_only", read_only), ("full", full), ("config", tmp_path / "config.yaml"))}
    launcher = mount_namespace(
        f"mount -t tmpfs -o size=64k tmpfs {quoted['full']} && head -c 65536 /dev/zero > {quoted['full']}/filler && "
        f"mount -t tmpfs -o size=64k tmpfs {quoted['read_only']} && mkdir {quoted['read_only']}/run && "
        f"cp {quoted['config']} {quoted['read_only']}/run/ && mount -o remount,ro {quoted['read_only']}")
    erofs, enospc = os.strerror(errno.EROFS), os.strerror(errno.ENOSPC)
    commands = [*writing_commands(read_only / "runs"), *writing_commands(full / "runs"),
                ["run", "--resume", str(read_only / "run")], ["sample", "--out", str(full / "grid.png")]]
    fragments = [*([f"cannot create {role} {read_only / 'runs'}: {erofs}"] for role in WRITTEN_DIRECTORY_ROLES),
                 *([f"cannot create {role} {full / 'runs'}: {enospc}"] for role in WRITTEN_DIRECTORY_ROLES),
                 [f"cannot write in run directory {read_only / 'run'}: {erofs}", "give --resume"],
                 [f"cannot write in output directory {full}: {enospc}", "give --out"]]
    assert_refused_before_anything_loads(commands, fragments, tmp_path, launcher)


def test_checks_of_one_new_directory_at_the_same_moment_all_pass_and_leave_nothing(tmp_path):
    """Runs started together into one new log directory each check it: one check's test directories must not
    make another fail, nor be left behind."""
    from ddpo.core.configuration.preflight import check_output_directory

    failures = []

    def check_repeatedly():
        for _ in range(50):
            try:
                check_output_directory(tmp_path / "new" / "runs", "log directory", "a directory you can write to")
            except UsageError as error:
                failures.append(str(error))

    threads = [threading.Thread(target=check_repeatedly) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and list(tmp_path.iterdir()) == []


def test_resume_refuses_flags_that_cannot_change_mid_run(cli_server, tmp_path):
    code, stderr = cli_server.run("run", *TINY, "--epochs", "1", "--logdir", str(tmp_path), "--run-name", "base")
    assert code == 0, stderr[-3000:]
    run_dir = tmp_path / "base"
    before = sorted(path for path in run_dir.rglob("*"))
    for flags, key in ((["--algo", "ddpo-sf"], "algorithm.name"), (["--model", "ddpm"], "model.name"),
                       (["--set", "sample.batch_size=4"], "sample.batch_size"),
                       (["--set", "train.grad_accum=2"], "train.grad_accum")):
        code, stderr = cli_server.run("run", "--resume", str(run_dir), *flags)
        assert code == 2 and f"'{key}' cannot change when resuming" in stderr, stderr[-2000:]
    assert sorted(path for path in run_dir.rglob("*")) == before


def test_a_plugin_whose_register_hook_raises_is_reported_and_the_others_load(tmp_path):
    site = make_distribution(tmp_path / "site", "raising_register", textwrap.dedent("""
        import ddpo

        @ddpo.hookimpl
        def register_rewards(register):
            raise ValueError("no reward today")
    """))
    result = run_cli("list", "--json", env={"PYTHONPATH": str(site)})
    assert result.returncode == 0, result.stderr
    assert ("plugin 'raising_register' failed to load: register_rewards raised ValueError: no reward today"
            in result.stderr)
    rewards = {item["name"] for item in json.loads(result.stdout)["rewards"]}
    assert {"digit", "compressibility"} <= rewards


def test_saved_config_is_what_resume_checks(tmp_path):
    """The keys a resume must keep exist in a saved config (a renamed key would silently pass the check)."""
    from ddpo.core.configuration.preflight import FIXED_ON_RESUME, _value

    saved = yaml.safe_load(run_cli("config").stdout)
    for key in FIXED_ON_RESUME:
        assert _value(saved, key) != {}, key
