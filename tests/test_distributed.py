"""Two CPU processes through `accelerate launch` (gloo): rewards and prompts are gathered, every rank takes part in
saving (no hang), only the main process writes the logs, and Ctrl-C stops every rank with a checkpoint."""

import os
import signal
import subprocess
import time

import torch

from helpers import read_metrics, two_process_launch


def test_two_process_run_gathers_rewards_and_saves_without_hanging(tiny_ddpm, tmp_path):
    command = two_process_launch(
        "run", "--model", "ddpm", "--set", f"model.pretrained={tiny_ddpm}", "--reward", "compressibility",
        "--set", "sample.num_steps=4", "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=2",
        "--set", "train.batch_size=4", "--set", "train.grad_accum=2",
        "--set", "advantage.per_prompt_stat_tracking=true", "--set", "prompts.name=simple_animals", "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    records = read_metrics(run_dir)
    assert [record["reward_queries"] for record in records] == [16, 32]  # 2 processes x 4 x 2 per epoch
    assert all(record["train/optimizer_steps"] == 1 for record in records)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert result.stderr.count("run directory:") == 1


def test_ctrl_c_under_accelerate_launch_stops_every_rank_with_a_checkpoint_and_resumes(tiny_ddpm, tmp_path):
    """A terminal Ctrl-C (SIGINT to the launcher's process group) once the run has a checkpoint: the launcher hands
    SIGINT on to both ranks, which stop after the current optimizer step or sampling batch and save, as one
    process does; the same launch with --resume continues. The launcher itself exits with its own error."""
    run_dir = tmp_path / "ddp"
    args = ["--model", "ddpm", "--set", f"model.pretrained={tiny_ddpm}", "--reward", "compressibility",
            "--set", "sample.num_steps=4", "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=2",
            "--set", "train.batch_size=4", "--set", "train.grad_accum=2", "--logdir", str(tmp_path),
            "--run-name", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(two_process_launch("run", *args, "--epochs", "200"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not ((run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())):
        assert time.monotonic() < deadline and process.poll() is None, "no checkpoint while the run ran"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    # The main rank reports the stop for both, naming the newest checkpoint and how to go on under the launcher.
    assert stderr.count("ddpo: error: interrupted") == 1, stderr[-3000:]
    newest = max((run_dir / "checkpoints").iterdir())
    assert f"{newest}" in stderr and "the same launch command and: ddpo run --resume" in stderr, stderr[-3000:]
    assert {path.name for path in newest.iterdir()} == {"weights.safetensors", "optimizer.pt", "algorithm.pt",
                                                        "trainer.json"}
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())

    resumed = subprocess.run(two_process_launch("run", *args, "--resume", str(run_dir), "--epochs", str(done + 2)),
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [record["epoch"] for record in read_metrics(run_dir)]
    assert epochs[-1] == done + 2 and epochs == sorted(epochs), epochs


def test_gradient_from_sampling_averages_the_step_over_processes(tiny_ddpm, tmp_path):
    """Under DDP a step taken wholly from the sampling pass has had no backward pass to all-reduce it: the
    accumulator averages it over the ranks itself, so the weights equal the ordinary two-process run's (AdamW's
    epsilon of 1 makes the step smooth in the gradient, as in test_onpolicy). Both runs go at once."""
    from safetensors.torch import load_file

    def launch(on: str) -> subprocess.Popen:
        command = two_process_launch(
            "run", "--model", "ddpm", "--set", f"model.pretrained={tiny_ddpm}", "--reward", "compressibility",
            "--set", "model.use_lora=true", "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
            "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
            "--set", "train.learning_rate=0.05", "--set", "train.adam_epsilon=1",
            "--set", f"train.gradient_from_sampling={on}", "--epochs", "1", "--logdir", str(tmp_path), "--run-name", on)
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    runs = {on: launch(on) for on in ("false", "true")}
    for on, process in runs.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    weights = {on: load_file(tmp_path / on / "checkpoints" / "epoch_0001" / "weights.safetensors") for on in runs}
    assert weights["true"].keys() == weights["false"].keys()
    for name in weights["false"]:
        assert torch.allclose(weights["true"][name], weights["false"][name], rtol=1e-4, atol=1e-6), name
