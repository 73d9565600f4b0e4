"""Two CPU processes through `accelerate launch` (gloo): rewards and prompts are gathered, every rank takes part in
saving (no hang), only the main process writes the logs, the ranks' weights stay identical, Ctrl-C stops every
rank with a checkpoint, and what the ranks compute together equals what one process holding all their samples
computes: DDPO's per-prompt normalisation, GRPO's groups that span processes, TDPO-R's neuron scores.

A launch costs 10-25 s of start-up, so the tests share launches, each made once per session even when xdist spreads
the tests over workers (`helpers.once_per_session`): one TDPO-R run, stopped by Ctrl-C and resumed (`tdpo_run`),
and GRPO's pair of runs with and without the gradient from sampling (`grpo_runs`): four launches, ~100 CPU-s,
which is why the file is in the slow tier.
Each rank writes what it saw to the run directory through the `ranks_probe` plugin (`RANKS_PROBE`); the tests
recompute it in float64 from the two ranks' dumps concatenated in rank order, as the gathers order them.
"""

import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_distribution, once_per_session, read_metrics, two_process_launch

pytestmark = pytest.mark.slow

RANKS_PROBE = '''
"""What each process saw, for the tests to recompute in one process: after every update,
ranks/epoch{E}-rank{R}.pt with the epoch's rewards, prompts, decoded images, group ids and advantages of this
process, and for
TDPO its returns (the per-prompt normalised rewards), the probe batch of its neuron scores as the critic's MLP reads
it, the MLP's linear layers and the scores; at the end of every epoch, weights/epoch{E}-rank{R}.safetensors with
every trained module's weights ("policy.", "critic.", ...)."""
import torch

import ddpo

_epoch_trajectory = []


@ddpo.hookimpl
def on_rewards(run, trajectory):
    with torch.no_grad():
        images = run.model.decode(trajectory.latents[:, -1].to(run.accelerator.device)).cpu()
    _epoch_trajectory[:] = [trajectory, images]


@ddpo.hookimpl
def on_update_end(run, metrics):
    from torch import nn

    from ddpo.plugins.algorithms.tdpo import TemporalDPO

    trajectory, images = _epoch_trajectory
    dump = {"rewards": trajectory.rewards.cpu(), "prompts": list(trajectory.prompts), "images": images,
            "group_ids": trajectory.group_ids.cpu(), "advantages": trajectory.advantages.cpu()}
    if isinstance(run.algorithm, TemporalDPO):
        critic = run.accelerator.unwrap_model(run.algorithm.critic)
        with torch.no_grad():
            dump["probe_inputs"] = critic.mlp_inputs(run.algorithm.probe_features(run, trajectory)).cpu()
        dump["critic_linears"] = [(layer.weight.detach().cpu().clone(), layer.bias.detach().cpu().clone())
                                  for layer in critic.mlp if isinstance(layer, nn.Linear)]
        dump["neuron_scores"] = [score.cpu() for score in run.algorithm.scores]
        dump["returns"] = trajectory.extras["returns"].cpu()
    directory = run.run_dir / "ranks"
    directory.mkdir(exist_ok=True)
    torch.save(dump, directory / f"epoch{run.epoch}-rank{run.accelerator.process_index}.pt")


@ddpo.hookimpl
def on_epoch_end(run, epoch, metrics):
    from safetensors.torch import save_file

    weights = {f"{name}.{key}": parameter.detach().cpu().contiguous() for name, trained in run.modules.items()
               for key, parameter in run.accelerator.unwrap_model(trained.module).named_parameters()
               if parameter.requires_grad}
    directory = run.run_dir / "weights"
    directory.mkdir(exist_ok=True)
    save_file(weights, str(directory / f"epoch{epoch}-rank{run.accelerator.process_index}.safetensors"))
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

PROMPTS = ["a cat", "a dog", "a fox"]
"""Few enough prompts that both ranks draw the same ones, and each gathers enough rewards to use its buffer."""
BUFFER_SIZE, MIN_COUNT = 8, 6
"""The per-prompt buffers of the TDPO-R run: with 16 samples an epoch over 3 prompts, some prompts use their buffer
in epoch 1 and others the epoch's statistics, and by epoch 2 buffers overflow."""
GROUP_SIZE = 8
"""GRPO's group in `grpo_runs`: twice a process's 4 samples, one group made of both ranks' samples."""


@dataclass
class Launch:
    """How a two-process launch ended: the launcher's exit code and stderr."""

    returncode: int
    stderr: str


@dataclass
class InterruptedRun:
    """`tdpo_run`: the run directory, the launch Ctrl-C stopped with the newest checkpoint it left and the number
    of epochs logged by then, and the launch that resumed it."""

    run_dir: Path
    interrupted: Launch
    newest_checkpoint: Path
    epochs_before_resume: int
    resumed: Launch


def start(directory: Path, name: str, *ddpo_args: str, **popen_options) -> subprocess.Popen:
    """`ddpo run ARGS` on two processes into `directory`/`name`, with the ranks probe (made in `directory` once) on
    the path."""
    plugin = directory / "ranks-probe"
    if not plugin.exists():
        make_distribution(plugin, "ranks_probe", RANKS_PROBE)
    command = two_process_launch("run", *ddpo_args, "--logdir", str(directory), "--run-name", name)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, "PYTHONPATH": str(plugin)}, **popen_options)


def finish(process: subprocess.Popen, timeout: float = 600) -> Launch:
    """Wait for a launch of `start`."""
    _, stderr = process.communicate(timeout=timeout)
    return Launch(process.returncode, stderr)


def rank_dumps(run_dir: Path, epoch: int) -> list[dict]:
    """The ranks probe's dumps of `epoch`, rank 0's first."""
    return [torch.load(run_dir / "ranks" / f"epoch{epoch}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]


# The GRPO tests come first: on two workers, xdist's worksteal hands this module's first three tests to one and the
# rest to the other, so the two workers start with different launches.

@pytest.fixture(scope="module")
def grpo_runs(tmp_path_factory, request) -> dict[str, Path]:
    """The run directories of GRPO with groups of `GROUP_SIZE` on the tiny DDPM with LoRA, one epoch of 4 samples
    per process and one optimizer step, AdamW's epsilon of 1: with train.gradient_from_sampling "false" and "true"
    (the two launches go at once)."""
    def launch(directory: Path) -> None:
        processes = {on: start(
            directory, f"gradient-from-sampling-{on}", "--algo", "grpo", "--model", "ddpm",
            "--set", f"model.pretrained={request.getfixturevalue('tiny_ddpm')}", "--set", "model.use_lora=true",
            "--reward", "compressibility", "--set", f"algorithm.group_size={GROUP_SIZE}", "--set", "sample.num_steps=3",
            "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4",
            "--set", "train.grad_accum=1", "--set", "train.learning_rate=0.05", "--set", "train.adam_epsilon=1",
            "--set", f"train.gradient_from_sampling={on}", "--epochs", "1") for on in ("false", "true")}
        for process in processes.values():
            ended = finish(process)
            assert ended.returncode == 0, ended.stderr[-3000:]

    directory = once_per_session(tmp_path_factory, "grpo-runs", launch)
    return {on: directory / f"gradient-from-sampling-{on}" for on in ("false", "true")}


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO's advantages in float64: consecutive `group_size` samples are a group, A = (r - group mean) / (group std
    + 1e-4)."""
    groups = rewards.double().reshape(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, unbiased=False, keepdim=True) + 1e-4)).flatten()


def test_grpo_groups_span_the_ranks_and_each_rank_keeps_its_rows(grpo_runs):
    """A group of 8 made of both ranks' 4 samples: the group ids the ranks gather number the samples of all ranks in
    rank order, both ranks share the group's id, and each rank's advantages are its slice of the group-relative
    advantages of all 8 rewards, not of its own 4 (group-standardised values of 8 stay within +-sqrt(7), inside
    the clip)."""
    ranks = rank_dumps(grpo_runs["false"], 1)
    group_ids = torch.cat([rank["group_ids"] for rank in ranks])
    assert torch.equal(group_ids, torch.arange(len(group_ids)) // GROUP_SIZE)
    assert set(ranks[0]["group_ids"].tolist()) & set(ranks[1]["group_ids"].tolist())
    together = group_advantages(torch.cat([rank["rewards"] for rank in ranks]), GROUP_SIZE)
    for index, rank in enumerate(ranks):
        advantages = rank["advantages"].double()
        assert torch.allclose(advantages, together[index * 4:(index + 1) * 4], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(advantages, group_advantages(rank["rewards"], 4), rtol=1e-3, atol=1e-3)


def test_diversity_is_measured_over_every_ranks_samples(grpo_runs):
    """`monitor/diversity` pairs the samples of both ranks (gathered features and prompts), not each rank's own:
    it equals the measure of all 8 images recomputed in one process, which differs from rank 0's 4 alone."""
    from ddpo.core.engine.monitors import diversity, image_features

    ranks = rank_dumps(grpo_runs["false"], 1)
    images = torch.cat([rank["images"] for rank in ranks])
    prompts = [prompt for rank in ranks for prompt in rank["prompts"]]
    [record] = read_metrics(grpo_runs["false"])
    expected = diversity(image_features(images), prompts)
    assert record["monitor/diversity"] == pytest.approx(expected, rel=1e-5)
    alone = diversity(image_features(ranks[0]["images"]), ranks[0]["prompts"])
    assert abs(alone - expected) > 1e-3 * expected


def test_gradient_from_sampling_averages_the_step_over_processes(grpo_runs):
    """Under DDP a step taken wholly from the sampling pass has had no backward pass to all-reduce it: the
    accumulator averages it over the ranks itself, so the weights equal the ordinary two-process run's (AdamW's
    epsilon of 1 makes the step smooth in the gradient, as in test_onpolicy)."""
    weights = {on: load_file(run_dir / "checkpoints" / "epoch_0001" / "weights.safetensors")
               for on, run_dir in grpo_runs.items()}
    assert weights["true"].keys() == weights["false"].keys()
    for name in weights["false"]:
        assert torch.allclose(weights["true"][name], weights["false"][name], rtol=1e-4, atol=1e-6), name


@pytest.fixture(scope="module")
def tdpo_run(tmp_path_factory, request) -> InterruptedRun:
    """TDPO-R on the tiny SD pipeline with LoRA, 2 x 4 samples per process and epoch drawn from `PROMPTS`,
    per-prompt normalisation with `BUFFER_SIZE` and `MIN_COUNT`, a pixel critic whose neurons are reset every 2
    epochs, every checkpoint kept. A terminal Ctrl-C (SIGINT to the launcher's process group) stops it once epoch
    2's checkpoint is saved; the same launch with --resume then runs one more epoch."""
    def launch(directory: Path) -> None:
        prompts = directory / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        run_dir = directory / "tdpo-r"
        tiny_sd = request.getfixturevalue("tiny_sd")  # made only by the worker that launches
        args = ["--algo", "tdpo-r", "--model", "sd14", "--set", f"model.pretrained={tiny_sd}",
                "--set", "model.use_lora=true", "--set", "train.learning_rate=1e-2", "--reward", "compressibility",
                "--set", "algorithm.critic_features=pixels", "--set", "algorithm.reset_every=2",
                "--set", "prompts.name=file", "--set", f"prompts.path={prompts}",
                "--set", "advantage.per_prompt_stat_tracking=true", "--set", f"advantage.buffer_size={BUFFER_SIZE}",
                "--set", f"advantage.min_count={MIN_COUNT}", "--set", "sample.num_steps=3",
                "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=2", "--set", "train.batch_size=4",
                "--set", "train.grad_accum=2", "--set", "keep_checkpoints=0"]
        process = start(directory, "tdpo-r", *args, "--epochs", "100", start_new_session=True)
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "epoch_0002").is_dir():  # a checkpoint appears whole (renamed)
            assert time.monotonic() < deadline and process.poll() is None, "no checkpoint of epoch 2 while the run ran"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        interrupted = finish(process, timeout=300)
        newest = max((run_dir / "checkpoints").iterdir())
        done = len(read_metrics(run_dir))
        resumed = finish(start(directory, "tdpo-r", *args, "--resume", str(run_dir), "--epochs", str(done + 1)))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        (directory / "launches.json").write_text(json.dumps({
            "interrupted": asdict(interrupted), "newest_checkpoint": str(newest), "epochs_before_resume": done,
            "resumed": asdict(resumed)}))

    directory = once_per_session(tmp_path_factory, "tdpo-r-run", launch)
    launches = json.loads((directory / "launches.json").read_text())
    return InterruptedRun(directory / "tdpo-r", Launch(**launches["interrupted"]), Path(launches["newest_checkpoint"]),
                          launches["epochs_before_resume"], Launch(**launches["resumed"]))


def test_ctrl_c_under_accelerate_launch_stops_every_rank_with_a_checkpoint_and_resumes(tdpo_run):
    """The terminal Ctrl-C of `tdpo_run`: the launcher hands SIGINT on to both ranks, which stop after the current
    optimizer step or sampling batch and save, as one process does; the main rank alone reports it, naming the
    newest checkpoint and how to go on under the launcher (the launcher itself exits with its own error). The
    same launch with --resume continues, and every epoch is logged once."""
    interrupted = tdpo_run.interrupted
    assert interrupted.returncode != 0
    assert interrupted.stderr.count("ddpo: error: interrupted") == 1, interrupted.stderr[-3000:]
    assert (f"{tdpo_run.newest_checkpoint}" in interrupted.stderr
            and "the same launch command and: ddpo run --resume" in interrupted.stderr), interrupted.stderr[-3000:]
    assert {path.name for path in tdpo_run.newest_checkpoint.iterdir()} == {
        "weights.safetensors", "lora", "optimizer.pt", "algorithm.pt", "modules", "trainer.json"}
    epochs = [record["epoch"] for record in read_metrics(tdpo_run.run_dir)]
    assert epochs == list(range(1, tdpo_run.epochs_before_resume + 2)), epochs


def test_two_process_run_gathers_rewards_and_saves_without_hanging_and_only_the_main_process_logs(tdpo_run):
    """Both ranks' rewards are counted and logged (reward/mean is the mean of the 16 the ranks drew), both take
    part in every checkpoint (a rank that skipped one would hang the other), and only the main process writes
    TensorBoard events (one file per launch) and prints the run directory."""
    records = read_metrics(tdpo_run.run_dir)
    assert [record["reward_queries"] for record in records] == [16 * record["epoch"] for record in records]
    for epoch, record in enumerate(records[:2], start=1):  # 2 processes x 4 x 2 per epoch
        rewards = torch.cat([dump["rewards"] for dump in rank_dumps(tdpo_run.run_dir, epoch)])
        assert len(rewards) == 16 and record["reward/mean"] == pytest.approx(rewards.double().mean().item(), rel=1e-6)
        # TDPO's temporal order: 3 trained steps x 2 minibatches of 4, a step every 2 micro-steps
        assert record["train/optimizer_steps"] == 3
    assert len(list(tdpo_run.run_dir.glob("events.out.tfevents.*"))) == 2
    assert sorted(path.name for path in (tdpo_run.run_dir / "checkpoints").iterdir()) == [
        f"epoch_{record['epoch']:04d}" for record in records]
    assert tdpo_run.resumed.stderr.count("run directory:") == 1


def test_two_process_updates_leave_identical_weights_on_both_ranks(tdpo_run):
    """Each rank's trained weights equal the other's bit for bit, and the epoch's checkpoint holds them: after
    epoch 2's LoRA and critic updates and its reset of the critic's active neurons (chosen from the neuron scores,
    redrawn from a seeded stream; ranks choosing different neurons would part for good, as DDP syncs gradients,
    not weights), and after the last epoch, which followed the resume."""
    run_dir = tdpo_run.run_dir
    records = read_metrics(run_dir)
    assert records[1]["critic/resets"] == 1  # epoch 2's reset
    for epoch in (2, records[-1]["epoch"]):
        first, second = (load_file(run_dir / "weights" / f"epoch{epoch}-rank{rank}.safetensors") for rank in (0, 1))
        assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
        policy = {key.removeprefix("policy."): tensor for key, tensor in first.items() if key.startswith("policy.")}
        critic = {key.removeprefix("critic."): tensor for key, tensor in first.items() if key.startswith("critic.")}
        assert policy and all("lora" in key for key in policy) and critic and len(policy) + len(critic) == len(first)
        assert any(not torch.equal(tensor, torch.zeros_like(tensor)) for key, tensor in policy.items()
                   if "lora_B" in key)  # the updates moved the adapters (B starts at zero)
        checkpoint = run_dir / "checkpoints" / f"epoch_{epoch:04d}"
        for saved, held in ((load_file(checkpoint / "weights.safetensors"), policy),
                            (load_file(checkpoint / "modules" / "critic.safetensors"), critic)):
            assert saved.keys() == held.keys() and all(torch.equal(saved[key], held[key]) for key in held)


def per_prompt_advantages(epochs: list[tuple[list[str], torch.Tensor]]) -> tuple[list[torch.Tensor], set[str]]:
    """DDPO's per-prompt advantages of each epoch's (prompts, rewards), in float64 from their definition (DESIGN.md
    section 8): a prompt's rewards join its buffer of its newest `BUFFER_SIZE`; with at least `MIN_COUNT` there,
    A = (r - buffer mean) / (buffer std + 1e-6), else the epoch's mean and std replace the buffer's. Also returns
    which statistics were used: "buffer", "epoch" or both."""
    buffers: dict[str, list[float]] = {}
    advantages, used = [], set()
    for prompts, rewards in epochs:
        rewards = rewards.double()
        epoch_advantages = torch.empty_like(rewards)
        for prompt in set(prompts):
            rows = torch.tensor([drawn == prompt for drawn in prompts])
            buffers[prompt] = (buffers.get(prompt, []) + rewards[rows].tolist())[-BUFFER_SIZE:]
            enough = len(buffers[prompt]) >= MIN_COUNT
            statistics = torch.tensor(buffers[prompt], dtype=torch.float64) if enough else rewards
            used.add("buffer" if enough else "epoch")
            epoch_advantages[rows] = (rewards[rows] - statistics.mean()) / (statistics.std(unbiased=False) + 1e-6)
        advantages.append(epoch_advantages)
    return advantages, used


def test_per_prompt_normalisation_uses_both_ranks_rewards_and_each_rank_keeps_its_own_rows(tdpo_run):
    """TDPO's returns are `Run.default_advantages`: rewards gathered over the processes, normalised per prompt with
    running buffers, each process keeping its rows. Each rank's returns equal its slice of what one process holding
    both ranks' samples (rank 0's first) computes, and differ from what the rank would compute alone. The run
    must exercise what crosses ranks: a prompt drawn on both ranks every epoch, buffers and the epoch's statistics
    both in use, and a buffer that overflows."""
    dumps = [rank_dumps(tdpo_run.run_dir, epoch) for epoch in (1, 2)]
    for ranks in dumps:
        assert set(ranks[0]["prompts"]) & set(ranks[1]["prompts"])
    gathered = [(ranks[0]["prompts"] + ranks[1]["prompts"], torch.cat([rank["rewards"] for rank in ranks]))
                for ranks in dumps]
    assert max(sum(prompts.count(prompt) for prompts, _ in gathered) for prompt in PROMPTS) > BUFFER_SIZE
    expected, used = per_prompt_advantages(gathered)
    assert used == {"buffer", "epoch"}
    for rank in (0, 1):
        alone, _ = per_prompt_advantages([(ranks[rank]["prompts"], ranks[rank]["rewards"]) for ranks in dumps])
        for ranks, together, by_itself in zip(dumps, expected, alone, strict=True):
            returns = ranks[rank]["returns"].double()
            assert torch.allclose(returns, together[rank * 8:(rank + 1) * 8], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(returns, by_itself, rtol=1e-3, atol=1e-3)


def neuron_scores(linears: list[tuple[torch.Tensor, torch.Tensor]], probe: torch.Tensor) -> list[torch.Tensor]:
    """TDPO-R's score of every hidden neuron of an MLP of `linears` (weight, bias), no activations, on a probe batch,
    in float64 (DESIGN.md section 8): the mean of |ReLU(h)| over the batch, over the layer's mean of that (+1e-9)."""
    hidden, scores = probe.double(), []
    for weight, bias in linears[:-1]:
        hidden = hidden @ weight.double().T + bias.double()
        activity = hidden.clamp(min=0).mean(dim=0)
        scores.append(activity / (activity.mean() + 1e-9))
    return scores


def test_neuron_scores_are_the_mean_reduced_activity_of_both_ranks_probes(tdpo_run):
    """Each rank scores the critic's neurons on its own probe batch and averages the per-layer activity over the
    processes before normalising, so both ranks choose the same neurons to reset. Epoch 1's scores (epoch 2's
    reset changes the critic after scoring) are equal on both ranks and equal the scores of the two probe batches
    together (equal sizes: the mean of the two means), and differ from either rank's own."""
    ranks = rank_dumps(tdpo_run.run_dir, 1)
    linears = ranks[0]["critic_linears"]
    assert all(torch.equal(a, b) for pair in zip(linears, ranks[1]["critic_linears"], strict=True)
               for a, b in zip(*pair, strict=True))
    probes = [rank["probe_inputs"] for rank in ranks]
    assert probes[0].shape == probes[1].shape and not torch.allclose(probes[0], probes[1])
    reduced = ranks[0]["neuron_scores"]
    assert len(reduced) == len(linears) - 1
    assert all(torch.equal(a, b) for a, b in zip(reduced, ranks[1]["neuron_scores"], strict=True))
    reduced = torch.cat(reduced).double()  # every hidden layer's scores, in order
    assert (reduced - torch.cat(neuron_scores(linears, torch.cat(probes)))).abs().max() < 1e-5  # float32's rounding
    for probe in probes:
        assert (reduced - torch.cat(neuron_scores(linears, probe))).abs().max() > 1e-3
