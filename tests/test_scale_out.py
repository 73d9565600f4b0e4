"""Scale-out: FSDP2 through `ddpo run --distributed fsdp` and DeepSpeed ZeRO-2/3 through `--distributed zero2|zero3`
on two CPU processes (gloo), LoRA and full fine-tuning, checkpoints and exact resume under sharding, the same first
update as data parallel; a two-"node" launch on one machine (accelerate's --num_machines 2, rendezvous on 127.0.0.1,
one process per node); and the shipped accelerate config files and the CLI's refusals.

Launches cost 15-30 s of CPU each, so the slow tests share them, made once per session (`helpers.once_per_session`):
`fsdp_runs` (five launches), `zero_runs` (six) and `two_node_run` (two launchers that meet). Each process writes
what it holds through the `scale_probe` plugin (`SCALE_PROBE`). The DeepSpeed tests are skipped where deepspeed is
not installed (it is not a test extra: `pip install --no-build-isolation deepspeed`, and its first launch compiles
DeepSpeed's shared-memory collective op for the CPU).
"""

import importlib.util
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
or whole tensors, and this process's share of their elements; under DeepSpeed, ZeRO's stage, the weights ZeRO-3
partitions and this process's share of them and of the optimizer's fp32 copy) and where the process runs (its rank,
and its node: torchrun's GROUP_RANK); at the end of every epoch, the whole trained weights as this rank sees them."""
import json
import os

import ddpo


@ddpo.hookimpl
def on_run_start(run):
    from ddpo.core.engine.distributed import deepspeed_engine, is_sharded

    parameters = [parameter for parameter in run.model.denoiser.parameters() if parameter.requires_grad]
    record = {"rank": run.accelerator.process_index, "processes": run.accelerator.num_processes,
              "node": int(os.environ.get("GROUP_RANK", "0")), "parameters": len(parameters),
              "sharded": sum(is_sharded(parameter) for parameter in parameters),
              "elements": sum(getattr(parameter, "ds_numel", parameter.numel()) for parameter in parameters),
              "local_elements": sum((parameter.to_local() if is_sharded(parameter) else parameter).numel()
                                    for parameter in parameters)}
    engine = deepspeed_engine(run.accelerator)
    if engine is not None:
        optimizer = engine.optimizer  # ZeRO's: the fp32 copy of this rank's partition of the trained weights
        fp32 = getattr(optimizer, "single_partition_of_fp32_groups", None) or optimizer.fp32_partitioned_groups_flat
        record.update(zero_stage=engine.zero_optimization_stage(),
                      partitioned=sum(hasattr(parameter, "ds_tensor") for parameter in parameters),
                      local_elements=sum(parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor")
                                         else parameter.numel() for parameter in parameters),
                      local_optimizer_elements=sum(tensor.numel() for tensor in fp32))
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


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install --no-build-isolation deepspeed)")


ZERO_RUNS = {"zero2-lora": ("zero2", "lora", "ddp-lora"), "zero3-lora": ("zero3", "lora", "ddp-lora"),
             "zero2-full": ("zero2", "full", "full"), "zero3-full": ("zero3", "full", "full")}
"""Each DeepSpeed run of `zero_runs`: its ZeRO config, its model ("lora": LoRA on the tiny SD pipeline, "full": every
weight of the tiny DDPM, as in `fsdp_runs`) and the `fsdp_runs` run it is compared with."""
ZERO_RESUMED = ("zero2-lora", "zero3-full")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, request) -> Path:
    """Two epochs each, two processes, with `fsdp_runs`' settings: `ddpo run --distributed zero2|zero3` with LoRA and
    with all weights trained (ZERO_RUNS), and two of them resumed from their epoch-1 checkpoint in a copy of their run
    directory ("...-resumed"; one per stage and per kind of fine-tuning, for the CPU time)."""
    def launch(directory: Path) -> None:
        env = probe_env(directory)
        models = {"lora": ["--model", "sd14", "--set", f"model.pretrained={request.getfixturevalue('tiny_sd')}",
                           "--set", "model.use_lora=true"],
                  "full": ["--model", "ddpm", "--set", f"model.pretrained={request.getfixturevalue('tiny_ddpm')}",
                           "--set", "model.use_lora=false"]}
        ddpo = [sys.executable, "-m", "ddpo", "run", "--num-processes", "2"]
        started = [start([*ddpo, "--distributed", stage, *models[model], *SMALL, "--epochs", "2", "--logdir",
                          str(directory), "--run-name", name], env) for name, (stage, model, _) in ZERO_RUNS.items()]
        for process in started:
            finish(process)
        resumed = []
        for name in ZERO_RESUMED:
            copy = directory / f"{name}-resumed"
            shutil.copytree(directory / name, copy)
            shutil.rmtree(copy / "checkpoints" / "epoch_0002")
            resumed.append(start([*ddpo, "--distributed", ZERO_RUNS[name][0], "--resume", str(copy), "--epochs", "2"],
                                 env))
        for process in resumed:
            finish(process)

    return once_per_session(tmp_path_factory, "zero-runs", launch)


def tensors_of(state) -> list[torch.Tensor]:
    """Every tensor in a nested checkpoint object (dicts, lists), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [tensor for key in sorted(state, key=str) for tensor in tensors_of(state[key])]
    if isinstance(state, (list, tuple)):
        return [tensor for item in state for tensor in tensors_of(item)]
    return []


def zero_partitions(run_dir: Path, epoch: int) -> list[list[torch.Tensor]]:
    """The tensors of each rank's ZeRO optimizer partition in a checkpoint, rank 0's first."""
    directory = run_dir / "checkpoints" / f"epoch_{epoch:04d}" / "deepspeed"
    return [tensors_of(torch.load(directory / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False))
            for rank in (0, 1)]


@needs_deepspeed
@pytest.mark.slow
def test_zero_partitions_the_optimizer_state_and_zero3_the_weights(zero_runs):
    """Under ZeRO-2 each process keeps the fp32 optimizer copy of half the trained weights and the weights
    themselves whole; under ZeRO-3 the trained weights are partitioned too, each process holding about half of
    their elements; LoRA or full."""
    for name, (config, _, _) in ZERO_RUNS.items():
        stage = int(config[-1])
        ranks = probes(zero_runs / name, 0)
        for rank in ranks:
            assert (rank["processes"], rank["zero_stage"]) == (2, stage) and rank["parameters"] > 0
            assert rank["partitioned"] == (rank["parameters"] if stage == 3 else 0)
            assert 0.4 * rank["elements"] < rank["local_optimizer_elements"] < 0.6 * rank["elements"], rank
            share = rank["local_elements"] / rank["elements"]
            assert 0.4 < share < 0.6 if stage == 3 else share == 1, rank
        assert sum(rank["local_optimizer_elements"] for rank in ranks) >= ranks[0]["elements"]


@needs_deepspeed
@pytest.mark.slow
def test_zero_resume_continues_exactly(zero_runs):
    """A run resumed from its epoch-1 checkpoint under ZeRO-2 (LoRA) and ZeRO-3 (all weights), each rank reading its
    own partition, ends epoch 2 with the uninterrupted run's weights, each rank's optimizer partition and logged
    rewards, bit for bit; both ranks gather the same whole weights, and they moved."""
    for name in ZERO_RESUMED:
        run_dir, resumed = zero_runs / name, zero_runs / f"{name}-resumed"
        weights, weights_again = (load_file(directory / "checkpoints" / "epoch_0002" / "weights.safetensors")
                                  for directory in (run_dir, resumed))
        assert weights.keys() == weights_again.keys()
        assert all(torch.equal(weights[key], weights_again[key]) for key in weights)
        before = load_file(run_dir / "checkpoints" / "epoch_0001" / "weights.safetensors")
        assert not all(torch.equal(weights[key], before[key]) for key in weights)  # it trained
        for partition, partition_again in zip(zero_partitions(run_dir, 2), zero_partitions(resumed, 2), strict=True):
            assert len(partition) == len(partition_again) > 0
            assert all(torch.equal(tensor, again) for tensor, again in zip(partition, partition_again, strict=True))
        assert [row["reward/mean"] for row in read_metrics(run_dir)] == [row["reward/mean"]
                                                                          for row in read_metrics(resumed)]
        first, second = rank_weights(resumed, 2)
        assert all(torch.equal(first[key], second[key]) and torch.equal(first[key], weights[key]) for key in first)


@needs_deepspeed
@pytest.mark.slow
def test_zero_first_update_equals_data_parallel_and_checkpoints_hold_whole_weights(zero_runs, fsdp_runs):
    """ddpo sets DeepSpeed's accumulation boundary itself (three backward passes per step here, one per trained step
    position), so under ZeRO-2 and ZeRO-3 each epoch takes one optimizer step from the gradient norm data parallel
    sees (LoRA) or FSDP, itself data parallel's (all weights), with the same rewards, and the first update equals
    theirs up to float32 summation order (AdamW's first step, lr*g/(|g|+eps), magnifies that order's noise in the
    few weights whose gradient is near eps: under ZeRO-3, whose partitioned gradients sum in another order, 0.013%
    of the elements move by up to 2% of the 0.01 step; under ZeRO-2 none by 1e-6). The checkpoint
    holds the whole weights under data parallel's names and shapes (what `ddpo sample` loads) and diffusers' LoRA
    file, with DeepSpeed's per-rank partitions in place of optimizer.pt; resuming it without DeepSpeed is a one-line
    usage error."""
    for name, (config, _, reference) in ZERO_RUNS.items():
        path = zero_runs / name / "checkpoints" / "epoch_0001"
        zero, whole = load_file(path / "weights.safetensors"), checkpoint(fsdp_runs / reference, 1)[0]
        assert zero.keys() == whole.keys() and all(zero[key].shape == whole[key].shape for key in zero)
        differences = torch.cat([(zero[key] - whole[key]).abs().flatten() for key in zero])
        assert differences.max() < {"zero2": 1e-6, "zero3": 2e-4}[config], name
        assert (differences > 1e-5).float().mean() < 1e-3, name
        for row, reference_row in zip(read_metrics(zero_runs / name), read_metrics(fsdp_runs / reference), strict=True):
            assert row["train/optimizer_steps"] == reference_row["train/optimizer_steps"] == 1
            assert row["train/grad_norm"] == pytest.approx(reference_row["train/grad_norm"], rel=1e-5)
            assert row["reward/mean"] == pytest.approx(reference_row["reward/mean"], rel=1e-6)
        assert not (path / "optimizer.pt").exists()
        assert sorted(file.name for file in (path / "deepspeed").glob("*optim_states.pt")) == [
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    for name in ("zero2-lora", "zero3-lora"):
        path = zero_runs / name / "checkpoints" / "epoch_0001"
        lora = load_file(path / "lora" / "pytorch_lora_weights.safetensors")
        zero = load_file(path / "weights.safetensors")
        assert sorted(tensor.double().sum().item() for tensor in lora.values()) == pytest.approx(
            sorted(tensor.double().sum().item() for tensor in zero.values()), rel=1e-12, abs=1e-12)
    refused = subprocess.run([sys.executable, "-m", "ddpo", "run", "--resume", str(zero_runs / "zero2-full"),
                              "--epochs", "3"], capture_output=True, text=True, env=ENV, timeout=300)
    assert refused.returncode == 2 and "holds DeepSpeed's per-rank optimizer state" in refused.stderr, refused.stderr


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
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["algorithm.name=ddpo-sf", "train.gradient_from_sampling=true"],
     "hands its gradients to the optimizer itself"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["train.ema_decay=0.9"], "train.ema_decay averages whole weights"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, [],
     "set gradient_accumulation_steps: 1"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
      "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, [], "set zero3_init_flag: false"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "FSDP2 only; set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
     ["algorithm.name=ddpo-sf", "train.gradient_from_sampling=true"],
     "train.gradient_from_sampling swaps the LoRA matrices"),
])
def test_launches_ddpo_cannot_run_are_refused_before_anything_loads(monkeypatch, environment, sets, message):
    """What a launcher's environment asks that ddpo does not do is a usage error from `make_accelerator`, before the
    accelerator (and the process group) exists: under DeepSpeed the gradient from sampling, the moving average, an
    engine accumulation count of its own and ZeRO-3's partitioned construction; FSDP1, and the gradient from
    sampling under FSDP."""
    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.configuration.errors import UsageError
    from ddpo.core.engine.distributed import make_accelerator

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # make_accelerator's default on a machine without GPUs, undone after
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        make_accelerator(resolve_config(None, sets, {}))


def test_an_algorithm_module_of_its_own_is_refused_under_deepspeed():
    """ddpo drives one DeepSpeed engine, the policy's: an algorithm that registers a module of its own (DPOK's value
    baseline, TDPO-R's critic) under DeepSpeed gets a usage error naming the algorithm and the module. The
    accelerator stands in for one that prepared the policy into DeepSpeed's engine (accelerate's
    `deepspeed_engine_wrapped`), which only a DeepSpeed launch makes."""
    from types import SimpleNamespace

    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.configuration.errors import UsageError
    from ddpo.core.engine.run import Run

    run = Run(config=resolve_config(None, ["algorithm.name=dpok"], {}),
              accelerator=SimpleNamespace(deepspeed_engine_wrapped=object()), model=None, reward=None, algorithm=None,
              prompt_set=None, run_dir=Path("."), optimizer=None, stat_tracker=None, modules={"policy": None})
    value = torch.nn.Linear(2, 1)
    with pytest.raises(UsageError, match="algorithm 'dpok' trains a module of its own \\('value'\\)"):
        run.register_module("value", value, torch.optim.AdamW(value.parameters()))


def test_diffusion_nfts_old_policy_copy_is_refused_under_deepspeed():
    """DiffusionNFT swaps a whole copy of the trained weights in to sample (its old policy), which ZeRO's partitions
    do not allow (as the EMA): its setup under DeepSpeed is a usage error that names FSDP instead. The accelerator
    stands in for a DeepSpeed one, as above."""
    from types import SimpleNamespace

    from ddpo.core.configuration.errors import UsageError
    from ddpo.plugins.algorithms.nft import DiffusionNFT

    run = SimpleNamespace(accelerator=SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=object())))
    with pytest.raises(UsageError, match="diffusion-nft keeps its old policy .* --distributed fsdp"):
        DiffusionNFT().setup(run)
