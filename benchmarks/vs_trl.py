"""ddpo against trl's DDPOTrainer (trl 0.23.1, its last release with DDPO) on the same DDPO-IS workload, in one run.

Workload (both): a tiny random SD pipeline from `ddpo.testing.build_tiny_sd` (32x32 images, 16x16 latents),
8 x 2 samples per epoch, 20 DDIM steps (eta 1), CFG 5, train batch 8, 1 inner epoch, every timestep trained,
one optimizer step per train batch, LoRA rank 4 on to_q/to_k/to_v/to_out.0, fp32, CPU, JPEG-compressibility
reward, advantages over the epoch's batch. Each configuration runs in a fresh process (so start-up and peak
RSS are its own); trl runs in its own virtual environment (`benchmarks/.venv-trl`, created on first use with
pip: torch 2.13.0 from the local wheel, then trl 0.23.1 and its dependencies).

Reported per configuration: start-up (process spawn -> first epoch starts: imports, loading, LoRA), the first
epoch (warm-up), steady-state seconds per epoch (the fastest of the later epochs), and peak RSS. The floor is
the same UNet calls (sampling forwards under no_grad, training forward+backward) with nothing around them.
For ddpo's default run the epoch is also split into the CPU time inside the UNet's forward passes and the
backward passes (timed around `UNet2DConditionModel.forward` and `GradientAccumulator.backward`) and the
rest: ddpo's own work (scheduler steps, log-probs, decoding, rewards, logging).
Times are CPU seconds of the whole process (all threads: ddpo's reward worker too), with wall seconds beside
them: on a machine shared with other jobs, wall time moved by up to +-50% between runs while CPU time is
little affected by waiting, so the ratios use CPU time. With one thread per process it is the work done.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py [--epochs 4] [--no-trl] [--no-options] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from machine import cpu_model

HERE = Path(__file__).resolve().parent
TRL_VENV = HERE / ".venv-trl"
TRL_REQUIREMENTS = [["torch==2.13.0"], ["trl==0.23.1", "diffusers", "peft", "accelerate"]]
SAMPLE_BATCH, SAMPLE_BATCHES, STEPS, GUIDANCE, TRAIN_BATCH, LORA_RANK = 8, 2, 20, 5.0, 8, 4
RESULT = "vs-trl-result "

DDPO_SETTINGS = [
    f"sample.batch_size={SAMPLE_BATCH}", f"sample.batches_per_epoch={SAMPLE_BATCHES}", f"sample.num_steps={STEPS}",
    f"sample.guidance_scale={GUIDANCE}", "sample.eta=1.0", f"train.batch_size={TRAIN_BATCH}", "train.grad_accum=1",
    "train.inner_epochs=1", "train.timestep_fraction=1.0", "model.use_lora=true", f"model.lora_rank={LORA_RANK}",
    "advantage.per_prompt_stat_tracking=false", "device=cpu", "save_every=1000",
]
OPTIONS = {
    # name: (extra --set assignments, what it is)
    "compile": (["model.compile=true"], "torch.compile"),
    "channels_last": (["model.channels_last=true"], "weights channels-last"),
    "sample-bf16": (["model.sample_precision=bf16"], "sampling bf16, training fp32"),
    "bf16": ([], "mixed_precision=bf16"),
    "grad-ckpt": (["train.gradient_checkpointing=true"], "memory"),
    "steps_per_pass": ([f"train.steps_per_pass={STEPS}"], "a minibatch's steps in one pass"),
    "steps_per_pass+channels_last": ([f"train.steps_per_pass={STEPS}", "model.channels_last=true"], "both"),
    "adamw8bit": (["train.optimizer=adamw8bit"], "memory"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def durations(start: float, ends: list[float]) -> list[float]:
    return [end - begin for begin, end in zip([start, *ends[:-1]], ends)]


def report(spawned: float, run_start: tuple[float, float], epoch_ends: list[tuple[float, float]],
           network_cpu: list[float] | None = None) -> None:
    """Print a worker's result line for the parent: start-up, epoch durations (wall and CPU), peak RSS, and
    `network_cpu`, the CPU seconds of each epoch spent inside the UNet's forward and backward passes.
    `run_start` and `epoch_ends` are (time.time(), time.process_time()) pairs."""
    print(RESULT + json.dumps({"startup": run_start[0] - spawned, "startup_cpu": run_start[1],
                               "epochs": durations(run_start[0], [end[0] for end in epoch_ends]),
                               "epochs_cpu": durations(run_start[1], [end[1] for end in epoch_ends]),
                               "network_cpu": network_cpu, "peak_rss_mb": peak_rss_mb()}), flush=True)


def now() -> tuple[float, float]:
    return time.time(), time.process_time()


# -- workers (each in its own process) ------------------------------------------------------------------------

def ddpo_worker(job: dict) -> None:
    from diffusers import UNet2DConditionModel

    import ddpo
    from ddpo.core.config import resolve_config
    from ddpo.core.optim import GradientAccumulator
    from ddpo.core.plugins import get_plugin_manager
    from ddpo.core.trainer import train

    times: dict[str, list[float]] = {"start": [], "ends": [], "network": []}
    network_cpu = [0.0]  # CPU seconds inside the UNet's forward passes and the backward passes, so far

    def counted(function):
        def wrapper(*args, **kwargs):
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                network_cpu[0] += time.process_time() - start
        return wrapper

    UNet2DConditionModel.forward = counted(UNet2DConditionModel.forward)
    GradientAccumulator.backward = counted(GradientAccumulator.backward)

    class Clock:
        @ddpo.hookimpl
        def on_run_start(self, run):
            times["start"].append(now())
            times["network"].append(network_cpu[0])

        @ddpo.hookimpl
        def on_epoch_end(self, run, epoch, metrics):
            times["ends"].append(now())
            times["network"].append(network_cpu[0])

    get_plugin_manager().register(Clock())
    sets = [*DDPO_SETTINGS, f"model.pretrained={job['pipeline']}", *job["sets"]]
    flags = {"algorithm": {"name": "ddpo-is"}, "reward": {"name": "compressibility"}, "model": {"name": "sd14"},
             "prompts": {"name": "simple_animals"}, "mixed_precision": job.get("mixed_precision", "no"),
             "epochs": job["epochs"], "logdir": job["logdir"], "run_name": job["name"]}
    config = resolve_config(None, sets, flags)
    train(config)
    network = times["network"]
    report(job["spawned"], times["start"][0], times["ends"], [end - begin for begin, end in zip(network, network[1:])])


def trl_worker(job: dict) -> None:
    import io
    import random
    import warnings

    import numpy as np
    import torch
    from accelerate import PartialState
    from PIL import Image
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    warnings.filterwarnings("ignore")
    prompts = job["prompts"]

    def compressibility(images, batch_prompts, metadata):  # as ddpo's: -JPEG kB at quality 95
        pixels = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        sizes = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(array)).save(buffer, format="JPEG", quality=95)
            sizes.append(-buffer.tell() / 1000)
        return torch.tensor(sizes), {}

    rng = random.Random(0)
    config = DDPOConfig(
        num_epochs=job["epochs"], sample_num_steps=STEPS, sample_eta=1.0, sample_guidance_scale=GUIDANCE,
        sample_batch_size=SAMPLE_BATCH, sample_num_batches_per_epoch=SAMPLE_BATCHES, train_batch_size=TRAIN_BATCH,
        train_gradient_accumulation_steps=1, train_num_inner_epochs=1, train_timestep_fraction=1.0,
        mixed_precision="no", save_freq=1000, log_with=None, per_prompt_stat_tracking=False,
        async_reward_computation=False, allow_tf32=False, seed=0,
        project_kwargs={"project_dir": job["logdir"], "logging_dir": job["logdir"]})
    PartialState()  # trl's pipeline logs through accelerate's logger, which needs the state first
    pipeline = DefaultDDPOStableDiffusionPipeline(job["pipeline"], use_lora=True)
    trainer = DDPOTrainer(config, compressibility, lambda: (rng.choice(prompts), {}), pipeline)
    ends: list[tuple[float, float]] = []
    step = trainer.step

    def timed_step(epoch, global_step):
        result = step(epoch, global_step)
        ends.append(now())
        return result

    trainer.step = timed_step
    run_start = now()
    trainer.train()
    report(job["spawned"], run_start, ends)


def floor_worker(job: dict) -> None:
    """The UNet calls of one epoch and nothing else: 2 batches x 20 guided forwards without gradient, then
    2 train batches x 20 timesteps of guided forward + backward (batch 16 = 8 x [unconditional, conditional])."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipeline = StableDiffusionPipeline.from_pretrained(job["pipeline"])
    unet = pipeline.unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    tokens = pipeline.tokenizer(["a cat"] * SAMPLE_BATCH + [""] * SAMPLE_BATCH, padding="max_length",
                                return_tensors="pt", max_length=pipeline.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        embeds = pipeline.text_encoder(tokens)[0]
    size = unet.config.sample_size
    latents = torch.randn(2 * SAMPLE_BATCH, unet.config.in_channels, size, size)
    timestep = torch.full((2 * SAMPLE_BATCH,), 500)
    run_start, ends = now(), []
    for _ in range(job["epochs"]):
        unet.eval()
        with torch.no_grad():
            for _ in range(SAMPLE_BATCHES * STEPS):
                unet(latents, timestep, embeds).sample
        unet.train()
        for _ in range(SAMPLE_BATCH * SAMPLE_BATCHES // TRAIN_BATCH * STEPS):
            unet(latents, timestep, embeds).sample.mean().backward()
        ends.append(now())
    report(job["spawned"], run_start, ends)


WORKERS = {"ddpo": ddpo_worker, "trl": trl_worker, "floor": floor_worker}


# -- the parent -----------------------------------------------------------------------------------------------

def trl_python() -> tuple[Path | None, str]:
    """The trl venv's python, created and installed if missing; (None, why) if pip cannot install it."""
    python = TRL_VENV / "bin" / "python"
    marker = TRL_VENV / "installed.txt"
    if marker.is_file():
        return python, marker.read_text().strip()
    if not python.exists():
        print(f"creating {TRL_VENV} ...", file=sys.stderr)
        venv.create(TRL_VENV, with_pip=True)
    for packages in TRL_REQUIREMENTS:
        print(f"pip install {' '.join(packages)} into {TRL_VENV} ...", file=sys.stderr)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True)
        if result.returncode:
            return None, f"pip install {' '.join(packages)} failed: {result.stderr.strip().splitlines()[-1:]}"
    versions = subprocess.run([str(python), "-c", "import trl, torch, diffusers, transformers, peft, accelerate as a; "
                               "print(f'trl {trl.__version__}, torch {torch.__version__}, diffusers "
                               "{diffusers.__version__}, transformers {transformers.__version__}, peft "
                               "{peft.__version__}, accelerate {a.__version__}')"],
                              capture_output=True, text=True, check=True).stdout.strip()
    marker.write_text(versions + "\n")
    return python, versions


def run_worker(python: Path | str, kind: str, job: dict, cwd: str) -> dict:
    job = {**job, "spawned": time.time()}
    result = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", kind, json.dumps(job)],
                            capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{kind} worker {job.get('name', '')} failed (exit {result.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT):])


def steady(result: dict, key: str = "epochs_cpu") -> float:
    """The fastest epoch after the first (CPU seconds by default: see the module docstring)."""
    return min(result[key][1:] or result[key])


def line(label: str, result: dict, reference: float | None = None, floor: float | None = None) -> str:
    text = (f"{label:<44} {steady(result):6.2f} cpu-s/epoch ({steady(result, 'epochs'):6.2f} wall)  first epoch "
            f"{result['epochs_cpu'][0]:6.1f} cpu-s  start-up {result['startup_cpu']:4.1f} cpu-s "
            f"({result['startup']:4.1f} wall)  peak RSS {result['peak_rss_mb']:4.0f} MB")
    if reference is not None:
        text += f"  {steady(result) / reference:.2f}x"
    if floor is not None:
        text += f"  ({100 * (steady(result) / floor - 1):+.0f}% over floor)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per configuration (the first is warm-up)")
    parser.add_argument("--no-trl", action="store_true", help="skip trl (and its venv)")
    parser.add_argument("--no-options", action="store_true", help="skip the per-option ddpo runs")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(OPTIONS), help="options to measure")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        WORKERS[args.worker[0]](json.loads(args.worker[1]))
        return

    import torch

    from ddpo.plugins.prompts import SIMPLE_ANIMALS
    from ddpo.testing import build_tiny_sd

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"ddpo with torch {torch.__version__}")
    trl, why = (None, "skipped (--no-trl)") if args.no_trl else trl_python()
    print(f"trl venv: {why}")
    print(f"workload: tiny SD (ddpo.testing.build_tiny_sd), {SAMPLE_BATCH}x{SAMPLE_BATCHES} samples/epoch, {STEPS} "
          f"steps, CFG {GUIDANCE:g}, train batch {TRAIN_BATCH}, LoRA rank {LORA_RANK}, fp32, CPU; {args.epochs} epochs "
          "per configuration, steady state = fastest of epochs 2..N\n")
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = str(build_tiny_sd(Path(scratch) / "tiny-sd"))
        job = {"pipeline": pipeline, "epochs": args.epochs, "logdir": str(Path(scratch) / "runs"), "sets": [],
               "prompts": list(SIMPLE_ANIMALS)}
        results = {"ddpo": run_worker(sys.executable, "ddpo", {**job, "name": "ddpo"}, scratch)}
        if trl is not None:
            results["trl"] = run_worker(trl, "trl", {**job, "name": "trl"}, scratch)
        results["floor"] = run_worker(sys.executable, "floor", {**job, "name": "floor"}, scratch)
        floor = steady(results["floor"])
        reference = steady(results["trl"]) if "trl" in results else None
        print(line("ddpo (defaults)", results["ddpo"], reference, floor))
        if reference is not None:
            print(line("trl 0.23.1 DDPOTrainer", results["trl"], reference, floor))
        print(f"{'floor (the UNet calls alone)':<44} {floor:6.2f} cpu-s/epoch")
        ddpo = results["ddpo"]
        fastest = ddpo["epochs_cpu"].index(steady(ddpo))
        network, epoch = ddpo["network_cpu"][fastest], ddpo["epochs_cpu"][fastest]
        print(f"inside that ddpo epoch: {network:.2f} cpu-s in the UNet's forward and backward passes (the floor's "
              f"calls: {floor:.2f}), {epoch - network:.2f} cpu-s ({100 * (epoch - network) / epoch:.1f}%) in "
              "everything else")
        if reference is not None:
            trl_result = results["trl"]
            print(f"\nddpo / trl steady-state epoch: {steady(ddpo) / reference:.2f}x (CPU time); "
                  f"start-up ddpo {ddpo['startup_cpu']:.1f} vs trl {trl_result['startup_cpu']:.1f} cpu-s")
        if args.no_options:
            return
        print("\nper option (ddpo defaults plus the option; ratio to trl, overhead over the floor):")
        for name in args.only or OPTIONS:
            sets, what = OPTIONS[name]
            try:
                result = run_worker(sys.executable, "ddpo", {**job, "name": name, "sets": sets,
                                                             "mixed_precision": "bf16" if name == "bf16" else "no"},
                                    scratch)
            except SystemExit as error:
                print(f"{name:<44} not measured: {str(error).splitlines()[-1]}")
                continue
            print(line(f"{name} ({what})", result, reference, floor))


if __name__ == "__main__":
    main()
