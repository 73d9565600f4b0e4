"""ddpo against trl's DDPOTrainer (trl 0.23.1, its last release with DDPO) on the same DDPO-IS workload, in one run.

Workload (both): a tiny random SD pipeline from `ddpo.testing.build_tiny_sd` (32x32 images, 16x16 latents),
8 x 2 samples per epoch, 20 DDIM steps (eta 1), CFG 5, train batch 8, 1 inner epoch, every timestep trained,
one optimizer step per train batch, LoRA rank 4 on to_q/to_k/to_v/to_out.0, fp32, CPU, JPEG-compressibility
reward, advantages over the epoch's batch. Each configuration runs in fresh processes (so start-up and peak
RSS are its own), `--repeats` of them, interleaved round by round with the other configurations; trl runs in
its own virtual environment (`benchmarks/.venv-trl`, created on first use with pip: torch 2.13.0 from the
local wheel, then trl 0.23.1 and its dependencies).

Reported per configuration: start-up (CPU time until the first epoch starts: imports, loading, LoRA), the first
epoch (warm-up), the fastest later epoch, peak RSS, and the figures the targets are about, which are ratios to
the floor. The floor is the same UNet calls (sampling forwards under no_grad, training forward+backward) with
nothing around them, on the process's own copy of the UNet and LoRA. Every process runs a floor epoch right
after each of its epochs (not counted in the epoch), and a configuration's overhead is the median over its
later epochs of epoch / the floor epoch after it. This machine's speed drifts by 15% within minutes, and one
process can run 10% faster or slower than another for its whole life whatever it runs, so a time compared
with another process's decided little; an epoch and its floor share the process and the minute. The ratio
to trl divides the two overheads. For ddpo's default run the fastest epoch is also split into the CPU time
inside the UNet's forward passes and the backward passes (the main thread's CPU time around
`UNet2DConditionModel.forward` and `GradientAccumulator.backward`) and the rest: ddpo's own work (scheduler
steps, log-probs, decoding, rewards, logging).
Times are CPU seconds of the whole process (all threads: ddpo's reward worker too): on a machine shared with
other jobs, wall time moved by up to +-50% between runs while CPU time is little affected by waiting. With
one thread per process it is the work done.

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py [--epochs 3] [--repeats 2] [--no-trl] [--no-options]
                                                  [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
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
    "compile+channels_last": (["model.compile=true", "model.channels_last=true"], "both"),
    "compile+steps_per_pass=4": (["model.compile=true", "train.steps_per_pass=4"], "both"),
    "compile+steps_per_pass=2": (["model.compile=true", "train.steps_per_pass=2"], "both"),
    "gradient_from_sampling": (["train.gradient_from_sampling=true"], "sampled step"),
    "compile+gradient_from_sampling": (["model.compile=true", "train.gradient_from_sampling=true"], "both"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Floor:
    """The floor's UNet calls, on this process's own copy of the pipeline's UNet with the same LoRA: `epoch()`
    runs one epoch's worth (2 batches x 20 guided forwards without gradient, then 2 train batches x 20 guided
    forwards + backward, batch 16 = 8 x [unconditional, conditional]) and nothing else."""

    def __init__(self, pipeline_path: str):
        import torch
        from diffusers import StableDiffusionPipeline
        from peft import LoraConfig

        pipeline = StableDiffusionPipeline.from_pretrained(pipeline_path)
        self.unet = pipeline.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        tokens = pipeline.tokenizer(["a cat"] * SAMPLE_BATCH + [""] * SAMPLE_BATCH, padding="max_length",
                                    return_tensors="pt", max_length=pipeline.tokenizer.model_max_length).input_ids
        with torch.no_grad():
            self.embeds = pipeline.text_encoder(tokens)[0]
        size = self.unet.config.sample_size
        self.latents = torch.randn(2 * SAMPLE_BATCH, self.unet.config.in_channels, size, size)
        self.timestep = torch.full((2 * SAMPLE_BATCH,), 500)

    def epoch(self) -> float:
        """CPU seconds of one epoch's UNet calls."""
        import torch

        start = time.process_time()
        self.unet.eval()
        with torch.no_grad():
            for _ in range(SAMPLE_BATCHES * STEPS):
                self.unet(self.latents, self.timestep, self.embeds).sample
        self.unet.train()
        for _ in range(SAMPLE_BATCH * SAMPLE_BATCHES // TRAIN_BATCH * STEPS):
            self.unet(self.latents, self.timestep, self.embeds).sample.mean().backward()
        return time.process_time() - start


class Timeline:
    """A worker's record in CPU seconds: start-up (the process's CPU time when the run starts), then per epoch its
    time followed by a floor epoch in the same process (excluded from the epoch's time), so each epoch has a
    floor measured moments later."""

    def __init__(self, pipeline_path: str):
        self.pipeline_path = pipeline_path
        self.floor: Floor | None = None
        self.startup = 0.0
        self.epochs: list[float] = []
        self.floors: list[float] = []
        self.mark = 0.0

    def run_started(self) -> None:
        self.startup = self.mark = time.process_time()

    def epoch_ended(self) -> None:
        self.epochs.append(time.process_time() - self.mark)
        self.floor = self.floor or Floor(self.pipeline_path)
        self.floors.append(self.floor.epoch())
        self.mark = time.process_time()

    def report(self, **extra) -> None:
        """Print the result line the parent reads."""
        print(RESULT + json.dumps({"startup_cpu": self.startup, "epochs_cpu": self.epochs,
                                   "floors_cpu": self.floors, "peak_rss_mb": peak_rss_mb(), **extra}), flush=True)


# -- workers (each in its own process) ------------------------------------------------------------------------

def ddpo_worker(job: dict) -> None:
    from diffusers import UNet2DConditionModel

    import ddpo
    from ddpo.core.configuration.config import resolve_config
    from ddpo.core.engine.optim import GradientAccumulator
    from ddpo.core.engine.trainer import train
    from ddpo.core.plugin_api.registry import get_plugin_manager

    timeline = Timeline(job["pipeline"])
    network_cpu = [0.0]  # CPU seconds inside the UNet's forward passes and the backward passes, so far
    network_per_epoch: list[float] = []

    def counted(function):
        def wrapper(*args, **kwargs):
            start = time.thread_time()  # the calling thread's: the reward worker's CPU is not the network's
            try:
                return function(*args, **kwargs)
            finally:
                network_cpu[0] += time.thread_time() - start
        return wrapper

    UNet2DConditionModel.forward = counted(UNet2DConditionModel.forward)
    GradientAccumulator.backward = counted(GradientAccumulator.backward)

    class Clock:
        @ddpo.hookimpl
        def on_run_start(self, run):
            timeline.run_started()
            network_cpu[0] = 0.0

        @ddpo.hookimpl
        def on_epoch_end(self, run, epoch, metrics):
            network_per_epoch.append(network_cpu[0])
            timeline.epoch_ended()  # the floor's calls go through the counted forward too: reset after them
            network_cpu[0] = 0.0

    get_plugin_manager().register(Clock())
    sets = [*DDPO_SETTINGS, f"model.pretrained={job['pipeline']}", *job["sets"]]
    flags = {"algorithm": {"name": "ddpo-is"}, "reward": {"name": "compressibility"}, "model": {"name": "sd14"},
             "prompts": {"name": "simple_animals"}, "mixed_precision": job.get("mixed_precision", "no"),
             "epochs": job["epochs"], "logdir": job["logdir"], "run_name": job["name"]}
    train(resolve_config(None, sets, flags))
    timeline.report(network_cpu=network_per_epoch)


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
    timeline = Timeline(job["pipeline"])
    step = trainer.step

    def timed_step(epoch, global_step):
        result = step(epoch, global_step)
        timeline.epoch_ended()
        return result

    trainer.step = timed_step
    timeline.run_started()
    trainer.train()
    timeline.report()


WORKERS = {"ddpo": ddpo_worker, "trl": trl_worker}


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
    result = subprocess.run([str(python), str(Path(__file__).resolve()), "--worker", kind, json.dumps(job)],
                            capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULT)]
    if result.returncode or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{kind} worker {job.get('name', '')} failed (exit {result.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT):])


def steady(results: list[dict]) -> float:
    """The fastest epoch after the first, over a configuration's processes, in CPU seconds."""
    return min(min(result["epochs_cpu"][1:] or result["epochs_cpu"]) for result in results)


def over_floor(results: list[dict]) -> list[float]:
    """Each epoch after the first over the floor epoch measured right after it in the same process."""
    return [epoch / floor for result in results
            for epoch, floor in list(zip(result["epochs_cpu"], result["floors_cpu"]))[1:]]


def fastest(results: list[dict]) -> dict:
    """The process with the fastest epoch after the first."""
    return min(results, key=lambda result: steady([result]))


def line(label: str, results: list[dict], reference: list[dict] | None = None) -> str:
    """One configuration: its fastest epoch, its epochs over their floors (median and each), its ratio to the
    reference's (both relative to their own floors), warm-up, start-up and peak RSS."""
    best = fastest(results)
    ratios = over_floor(results)
    text = (f"{label:<40} {steady(results):6.2f} cpu-s/epoch  {100 * (statistics.median(ratios) - 1):+4.0f}% over "
            "floor")
    if reference is not None:
        text += f"  {statistics.median(ratios) / statistics.median(over_floor(reference)):.2f}x trl"
    return (text + f"  first epoch {best['epochs_cpu'][0]:5.1f}  start-up {best['startup_cpu']:4.1f} cpu-s  peak RSS "
            f"{max(result['peak_rss_mb'] for result in results):4.0f} MB  [epoch/floor: "
            f"{' '.join(f'{ratio:.2f}' for ratio in ratios)}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per process (the first is warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per configuration, interleaved")
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
          f"steps, CFG {GUIDANCE:g}, train batch {TRAIN_BATCH}, LoRA rank {LORA_RANK}, fp32, CPU; {args.repeats} "
          f"interleaved processes x {args.epochs} epochs per configuration, each epoch followed by a floor epoch in "
          "the same process; over floor = median of (epoch / its floor) after the first epoch\n")
    options = [] if args.no_options else (args.only or list(OPTIONS))
    with tempfile.TemporaryDirectory() as scratch:
        pipeline = str(build_tiny_sd(Path(scratch) / "tiny-sd"))
        job = {"pipeline": pipeline, "epochs": args.epochs, "logdir": str(Path(scratch) / "runs"), "sets": [],
               "prompts": list(SIMPLE_ANIMALS)}
        # (python, worker kind, job) per configuration; every round runs each once, so slow spells of a shared
        # machine hit all configurations alike instead of one
        configurations = {"ddpo": (sys.executable, "ddpo", job)}
        if trl is not None:
            configurations["trl"] = (trl, "trl", job)
        for name in options:
            sets, _ = OPTIONS[name]
            configurations[name] = (sys.executable, "ddpo", {**job, "sets": sets,
                                                             "mixed_precision": "bf16" if name == "bf16" else "no"})
        results: dict[str, list[dict]] = {name: [] for name in configurations}
        failures: dict[str, str] = {}
        for round_index in range(args.repeats):
            for name, (python, kind, config_job) in configurations.items():
                if name in failures:
                    continue
                print(f"round {round_index + 1}/{args.repeats}: {name} ...", file=sys.stderr, flush=True)
                try:
                    results[name].append(run_worker(python, kind, {**config_job, "name": f"{name}-{round_index}"},
                                                    scratch))
                except SystemExit as error:
                    if name not in options:
                        raise
                    failures[name] = str(error).splitlines()[-1]
        reference = results.get("trl")
        print(line("ddpo (defaults)", results["ddpo"], reference))
        if reference is not None:
            print(line("trl 0.23.1 DDPOTrainer", reference, reference))
        floors = [floor for result in results["ddpo"] for floor in result["floors_cpu"]]
        print(f"{'floor (the UNet calls alone)':<40} {min(floors):6.2f} cpu-s/epoch (fastest in ddpo's processes)")
        best = fastest(results["ddpo"])
        epoch_index = best["epochs_cpu"].index(steady([best]))
        network, epoch = best["network_cpu"][epoch_index], best["epochs_cpu"][epoch_index]
        print(f"inside ddpo's fastest epoch: {network:.2f} cpu-s in the UNet's forward and backward passes (its "
              f"floor epoch: {best['floors_cpu'][epoch_index]:.2f}), {epoch - network:.2f} cpu-s "
              f"({100 * (epoch - network) / epoch:.1f}%) in everything else")
        if options:
            print("\nper option (ddpo defaults plus the option):")
        for name in options:
            if name in failures:
                print(f"{name:<40} not measured: {failures[name]}")
            else:
                print(line(f"{name} ({OPTIONS[name][1]})", results[name], reference))


if __name__ == "__main__":
    main()
