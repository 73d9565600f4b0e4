"""Scale-out: FSDP2 through `ddpo run --distributed fsdp` on two CPU processes (gloo), LoRA and full fine-tuning,
checkpoints and exact resume under sharding, the same first update as data parallel; a two-"node" launch on one
machine (accelerate's --num_machines 2, rendezvous on 127.0.0.1, one process per node); and the shipped accelerate
config files and the CLI's refusals.

Launches cost 15-30 s of CPU each, so the slow tests share them, made once per session (`helpers.once_per_session`):
`fsdp_runs` (five launches) and `two_node_run` (two launchers that meet). Each process writes what it holds through
the `scale_probe` plugin (`SCALE_PROBE`).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers import (cli_cases_in_one_process, free_port, make_distribution, once_per_session, read_metrics,
                     two_process_launch)

SCALE_PROBE = '''
"""What each process holds: at the start of a run, how the policy's trainable weights are stored (FSDP's shards
or whole tensors, and this process's share of their elements) and where the process runs (its rank, and its node:
torchrun's GROUP_RANK); at the end of every epoch, the whole trained weights as this rank sees them."""
import json
import os

import ddpo


@ddpo.hookimpl
def on_run_start(run):
    from ddpo.core.distributed import is_sharded

    parameters = [parameter for parameter in run.model.denoiser.parameters() if parameter.requires_grad]
    record = {"rank": run.accelerator.process_index, "processes": run.accelerator.num_processes,
              "node": int(os.environ.get("GROUP_RANK", "0")), "parameters": len(parameters),
              "sharded": sum(is_sharded(parameter) for parameter in parameters),
              "elements": sum(parameter.numel() for parameter in parameters),
              "local_elements": sum((parameter.to_local() if is_sharded(parameter) else parameter).numel()
                                    for parameter in parameters)}
    directory = run.run_dir / "probe"
    directory.mkdir(exist_ok=True)
    (directory / f"start-epoch{run.epoch}-rank{record['rank']}.json").write_text(json.dumps(record))


@ddpo.hookimpl
def on_epoch_end(run, epoch, metrics):
    from safetensors.torch import save_file

    weights = run.model.trainable_state_dict()  # whole: under FSDP every rank gathers the shards
    save_file(weights, str(run.run_dir / "probe" / f"epoch{epoch}-rank{run.accelerator.process_index}.safetensors"))
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = ["--reward", "compressibility", "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
         "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
         "--set", "train.learning_rate=0.01", "--set", "keep_checkpoints=0", "--device", "cpu"]
"""One optimizer step per epoch on 4 samples per process, every checkpoint kept."""


def probe_env(directory: Path) -> dict[str, str]:
    plugin = directory / "scale-probe"
    if not plugin.exists():
        make_distribution(plugin, "scale_probe", SCALE_PROBE)
    return {**ENV, "PYTHONPATH": str(plugin)}


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen) -> str:
    """Wait for a launch; its stderr, after checking it succeeded."""
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def probes(run_dir: Path, epoch: int) -> list[dict]:
    """The probe's start records of the launch that began after `epoch`, rank 0's first."""
    return [json.loads((run_dir / "probe" / f"start-epoch{epoch}-rank{rank}.json").read_text()) for rank in (0, 1)]


def rank_weights(run_dir: Path, epoch: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(run_dir / "probe" / f"epoch{epoch}-rank{rank}.safetensors") for rank in (0, 1)]


def checkpoint(run_dir: Path, epoch: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A checkpoint's weights and optimizer state."""
    path = run_dir / "checkpoints" / f"epoch_{epoch:04d}"
    return load_file(path / "weights.safetensors"), torch.load(path / "optimizer.pt", weights_only=True)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, request) -> Path:
    """Two epochs each, two processes: `ddpo run --distributed fsdp` with LoRA on the tiny SD pipeline ("lora") and
    with all weights trained on the tiny DDPM ("full"), the same LoRA run as plain data parallel ("ddp-lora"), and
    each FSDP run resumed from its epoch-1 checkpoint in a copy of its run directory ("lora-resumed",
    "full-resumed")."""
    def launch(directory: Path) -> None:
        env = probe_env(directory)
        models = {"lora": ["--model", "sd14", "--set", f"model.pretrained={request.getfixturevalue('tiny_sd')}",
                           "--set", "model.use_lora=true"],
                  "full": ["--model", "ddpm", "--set", f"model.pretrained={request.getfixturevalue('tiny_ddpm')}",
                           "--set", "model.use_lora=false"]}
        fsdp = [sys.executable, "-m", "ddpo", "run", "--distributed", "fsdp", "--num-processes", "2"]
        runs = {name: start([*fsdp, *args, *SMALL, "--epochs", "2", "--logdir", str(directory), "--run-name", name],
                            env) for name, args in models.items()}
        runs["ddp-lora"] = start(two_process_launch("run", *models["lora"], *SMALL[:-2], "--epochs", "2",
                                                    "--logdir", str(directory), "--run-name", "ddp-lora"), env)
        for process in runs.values():
            finish(process)
        resumed = {}
        for name in models:
            copy = directory / f"{name}-resumed"
            shutil.copytree(directory / name, copy)
            shutil.rmtree(copy / "checkpoints" / "epoch_0002")
            resumed[name] = start([*fsdp, "--resume", str(copy), "--epochs", "2"], env)
        for process in resumed.values():
            finish(process)

    return once_per_session(tmp_path_factory, "fsdp-runs", launch)


@pytest.mark.slow
def test_fsdp_shards_the_trained_weights_over_both_processes(fsdp_runs):
    """Under `--distributed fsdp` every trainable weight of the policy is a DTensor and each process holds about
    half of their elements (FSDP2 shards dim 0; odd rows leave one rank a row more), LoRA or full; plain data
    parallel holds them whole on each."""
    for name in ("lora", "full"):
        ranks = probes(fsdp_runs / name, 0)
        for rank in ranks:
            assert rank["processes"] == 2 and rank["sharded"] == rank["parameters"] > 0
        assert sum(rank["local_elements"] for rank in ranks) == ranks[0]["elements"]
        assert all(rank["local_elements"] < 0.6 * rank["elements"] for rank in ranks), ranks
    for rank in probes(fsdp_runs / "ddp-lora", 0):
        assert rank["sharded"] == 0 and rank["local_elements"] == rank["elements"]


@pytest.mark.slow
def test_fsdp_resume_continues_exactly(fsdp_runs):
    """A run resumed from its epoch-1 checkpoint under FSDP (the whole weights and optimizer state cut back into
    shards) ends epoch 2 with the uninterrupted run's weights, optimizer state and logged rewards, bit for bit; the
    resumed launch shards again, and both ranks gather the same whole weights."""
    for name in ("lora", "full"):
        run_dir, resumed = fsdp_runs / name, fsdp_runs / f"{name}-resumed"
        assert probes(resumed, 1)[0]["sharded"] == probes(resumed, 1)[0]["parameters"]
        (weights, optimizer), (weights_again, optimizer_again) = checkpoint(run_dir, 2), checkpoint(resumed, 2)
        assert weights.keys() == weights_again.keys()
        assert all(torch.equal(weights[key], weights_again[key]) for key in weights)
        assert not all(torch.equal(weights[key], checkpoint(run_dir, 1)[0][key]) for key in weights)  # it trained
        for index, state in optimizer["state"].items():
            assert all(torch.equal(value, optimizer_again["state"][index][key]) for key, value in state.items())
        assert [row["reward/mean"] for row in read_metrics(run_dir)] == [row["reward/mean"]
                                                                          for row in read_metrics(resumed)]
        first, second = rank_weights(resumed, 2)
        assert all(torch.equal(first[key], second[key]) and torch.equal(first[key], weights[key]) for key in first)


@pytest.mark.slow
def test_fsdp_checkpoint_is_the_data_parallel_format_with_the_same_first_update(fsdp_runs):
    """A checkpoint written under FSDP holds whole tensors in the layout data parallel writes (the same weight names
    and shapes, the optimizer's own state_dict with whole moments), so either resumes the other; and FSDP's first
    update (reduce-scattered gradients, sharded AdamW) equals data parallel's (all-reduced), up to float32
    summation order. The SD LoRA run also exports diffusers' LoRA file from the gathered weights."""
    (sharded, sharded_optimizer), (whole, whole_optimizer) = checkpoint(fsdp_runs / "lora", 1), \
        checkpoint(fsdp_runs / "ddp-lora", 1)
    assert sharded.keys() == whole.keys() and all(sharded[key].shape == whole[key].shape for key in sharded)
    assert max(whole[key].abs().max().item() for key in whole if "lora_B" in key) > 1e-4  # B starts at zero
    for key in sharded:
        assert torch.allclose(sharded[key], whole[key], rtol=1e-4, atol=1e-6), key
    assert sharded_optimizer["param_groups"] == whole_optimizer["param_groups"]
    for index, state in whole_optimizer["state"].items():
        for key, value in state.items():
            assert sharded_optimizer["state"][index][key].shape == value.shape
            assert torch.allclose(sharded_optimizer["state"][index][key], value, rtol=1e-3, atol=1e-9)
    lora = load_file(fsdp_runs / "lora" / "checkpoints" / "epoch_0001" / "lora" / "pytorch_lora_weights.safetensors")
    assert sorted(tuple(tensor.shape) for tensor in lora.values()) == sorted(tuple(t.shape) for t in sharded.values())
    assert sorted(tensor.double().sum().item() for tensor in lora.values()) == pytest.approx(
        sorted(tensor.double().sum().item() for tensor in sharded.values()), rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, request) -> dict:
    """Two `accelerate launch` commands on this machine that meet as two nodes of one process each (--num_machines
    2, --machine_rank 0 and 1, rendezvous on 127.0.0.1): DDPO-IS with LoRA on the tiny DDPM, two epochs."""
    def launch(directory: Path) -> None:
        port = free_port()
        args = ["run", "--model", "ddpm", "--set", f"model.pretrained={request.getfixturevalue('tiny_ddpm')}",
                "--set", "model.use_lora=true", *SMALL[:-2], "--epochs", "2", "--logdir", str(directory),
                "--run-name", "two-nodes", "--device", "cpu"]
        nodes = [start([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                        "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
                        "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "ddpo", *args], probe_env(directory)) for node in (0, 1)]
        stderrs = [finish(node) for node in nodes]
        (directory / "stderr.json").write_text(json.dumps(stderrs))

    directory = once_per_session(tmp_path_factory, "two-node-run", launch)
    return {"run_dir": directory / "two-nodes", "stderr": json.loads((directory / "stderr.json").read_text())}


@pytest.mark.slow
def test_two_nodes_train_in_step_and_only_rank_zero_logs(two_node_run):
    """The two nodes' processes are ranks 0 and 1 of one run (node 0 holds rank 0); after each update both hold
    the same LoRA weights bit for bit, and they moved; each epoch's reward queries count both nodes' samples; only
    rank 0 writes the logs (one events file, one metrics row per epoch) and prints the run directory."""
    run_dir = two_node_run["run_dir"]
    assert [(rank["rank"], rank["node"], rank["processes"]) for rank in probes(run_dir, 0)] == [(0, 0, 2), (1, 1, 2)]
    previous = None
    for epoch in (1, 2):
        first, second = rank_weights(run_dir, epoch)
        assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
        if previous is not None:
            assert any(not torch.equal(first[key], previous[key]) for key in first)
        previous = first
    assert any("lora_B" in key and first[key].abs().max() > 0 for key in first)
    assert [(row["epoch"], row["reward_queries"]) for row in read_metrics(run_dir)] == [(1, 8), (2, 16)]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    node0, node1 = two_node_run["stderr"]
    assert "run directory:" in node0 and "run directory:" not in node1


def test_shipped_accelerate_configs_parse_and_the_cli_names_them(tmp_path):
    """`ddpo launch-config NAME` prints the path of a config file accelerate's own loader reads as FSDP2 or
    DeepSpeed ZeRO-2/3; a bad name and --num-processes without --distributed are one-line usage errors (exit 2)
    before anything heavy loads."""
    from accelerate.commands.config.config_args import load_config_from_file

    names = ("fsdp", "zero2", "zero3")
    cases, heavy = cli_cases_in_one_process(
        [["launch-config", name] for name in names] + [["launch-config", "zero1"], ["run", "--distributed", "ddp"],
                                                       ["run", "--num-processes", "2"]], tmp_path)
    paths = [Path(case["stdout"].strip()) for case in cases[:3]]
    assert [case["code"] for case in cases[:3]] == [0, 0, 0] and all(path.is_file() for path in paths)
    for case in cases[3:]:
        assert case["code"] == 2 and case["stderr"].count("\n") == 1, case
    assert "valid: fsdp, zero2, zero3" in cases[3]["stderr"] and "valid: fsdp, zero2, zero3" in cases[4]["stderr"]
    assert "--num-processes goes with --distributed" in cases[5]["stderr"]
    assert not heavy
    fsdp, zero2, zero3 = (load_config_from_file(str(path)) for path in paths)
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert (zero2.distributed_type, zero3.distributed_type) == ("DEEPSPEED", "DEEPSPEED")
    assert (zero2.deepspeed_config["zero_stage"], zero3.deepspeed_config["zero_stage"]) == (2, 3)
    assert yaml.safe_load(paths[0].read_text())["fsdp_config"]["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize(("environment", "sets", "message"), [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, [], "does not drive DeepSpeed's engine yet"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "FSDP2 only; set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
     ["algorithm.name=ddpo-sf", "train.gradient_from_sampling=true"],
     "train.gradient_from_sampling swaps the LoRA matrices"),
])
def test_launches_ddpo_cannot_run_are_refused_before_anything_loads(monkeypatch, environment, sets, message):
    """What a launcher's environment asks that ddpo does not do is a usage error from `make_accelerator`, before the
    accelerator (and the process group) exists: DeepSpeed, FSDP1, and the gradient from sampling under FSDP."""
    from ddpo.core.config import resolve_config
    from ddpo.core.distributed import make_accelerator
    from ddpo.core.errors import UsageError

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        make_accelerator(resolve_config(None, sets, {}))
