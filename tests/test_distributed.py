"""Two CPU processes through `accelerate launch` (gloo): rewards and prompts are gathered, every rank takes part in
saving (no hang), and only the main process writes the logs."""

import json
import os
import subprocess
import sys


def test_two_process_run_gathers_rewards_and_saves_without_hanging(tiny_ddpm, tmp_path):
    # accelerate's own --cpu flag runs a single process; --multi_gpu launches torchrun, and `--device cpu`
    # keeps every process on the CPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "ddpo", "run", "--model", "ddpm", "--set", f"model.pretrained={tiny_ddpm}",
               "--reward", "compressibility", "--set", "sample.num_steps=4", "--set", "sample.batch_size=4",
               "--set", "sample.batches_per_epoch=2", "--set", "train.batch_size=4", "--set", "train.grad_accum=2",
               "--set", "advantage.per_prompt_stat_tracking=true", "--set", "prompts.name=simple_animals",
               "--epochs", "2", "--logdir", str(tmp_path), "--run-name", "ddp", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ddp"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["reward_queries"] for record in records] == [16, 32]  # 2 processes x 4 x 2 per epoch
    assert all(record["train/optimizer_steps"] == 1 for record in records)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert result.stderr.count("run directory:") == 1
