"""A check for a GPU machine: what ddpo's sampling and training passes reach on the real denoiser architectures.

SD 1.4's UNet and SD3.5-Medium's transformer are built from their configs (written below; random weights, no hub:
speed and memory do not depend on the values), each with its model's real VAE and text encoders of the real output
widths but one layer (they run once per batch). Each model loads through ddpo's own model plugin (`sd14`, `sd3`)
and runs ddpo's code: `ddpo.core.rollout.sample_batch` for sampling (guided, eta 1, log-probs), the plugin's
`step_log_prob` with a DDPO surrogate and backward pass for training (LoRA rank 4, AdamW step), and
`ddpo.core.onpolicy.SamplingGradients` for `train.gradient_from_sampling`. At 512 px, bf16 autocast, for each of
torch.compile off/on (`model.compile`) x gradient checkpointing off/on (`train.gradient_checkpointing`):

- sampling samples/s: a batch of --batch images through --steps denoising steps and the VAE decode;
- training samples/s: one sample's training is a forward and backward pass per denoising step, so
  batch / (steps x seconds per step);
- peak memory of each phase (torch.cuda.max_memory_allocated);
- the fraction of the GPU's dense bf16 peak reached: model FLOPs (torch.utils.flop_counter on one eager guided
  forward, and one forward+backward; gradient checkpointing's recomputation is not counted, as MFU does not) /
  seconds / the peak in PEAK_BF16_TFLOPS (the vendors' datasheets, without sparsity);
- (compile off) the gradient-from-sampling saving: an epoch of DDPO-SF-like work is sampling + training every
  sample at every step; with the option it is one sampling pass with gradient. Saving = 1 - that time / the sum.

On a CPU it refuses (exit 2). `--dry-run` runs the same code on the CPU with the tiny pipelines of
`ddpo.testing` in float32, compile off, to show the script works (the test suite does; the figures mean nothing).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--batch 4] [--steps 4] [--models sd14,sd35m]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model

PEAK_BF16_TFLOPS = {
    "B200": 2250, "H200": 989, "GH200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "H100 NVL": 835,
    "H100 PCIe": 756, "H100": 756, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125,
    "RTX 6000 Ada": 364, "RTX A6000": 155, "RTX 4090": 165, "RTX 3090": 71, "MI300X": 1307, "MI250X": 383,
}
"""Dense bf16 tensor-core TFLOP/s by a part of the device name, most specific first (the first match wins).
Datasheet figures without sparsity; GPUs without bf16 tensor cores (V100, T4) are absent: no fraction for them."""

SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5)
"""CompVis/stable-diffusion-v1-4 unet/config.json (860M parameters)."""
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))
"""stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: dual attention in layers 0-12, QK
RMS-norm; 2.24B parameters and a 384 x 384 x 1536 position-embedding buffer, 2.47B values in all)."""
SD35M_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                 use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
MODELS = {"sd14": "SD 1.4 UNet", "sd35m": "SD3.5-Medium transformer"}
PLUGINS = {"sd14": "sd14", "sd35m": "sd3"}
RESOLUTION = 512
GUIDANCE = 5.0


def peak_tflops(device_name: str) -> float | None:
    for part, tflops in PEAK_BF16_TFLOPS.items():
        if part.lower() in device_name.lower():
            return float(tflops)
    return None


def _clip_text_config(tokenizer, hidden: int, projection: int | None = None):
    from transformers import CLIPTextConfig

    from ddpo.testing.builders import END, START

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                          num_hidden_layers=1, num_attention_heads=hidden // 64, max_position_embeddings=77,
                          projection_dim=projection or hidden, hidden_act="gelu",
                          bos_token_id=tokenizer.convert_tokens_to_ids(START),
                          eos_token_id=tokenizer.convert_tokens_to_ids(END),
                          pad_token_id=tokenizer.convert_tokens_to_ids(END))


def build_pipeline(model: str, directory: Path) -> Path:
    """Save the pipeline of `model` (a MODELS key) with random weights: the real denoiser and VAE, one-layer text
    encoders of the real widths (SD3.5 without T5: its pipeline then gives the transformer zeros of T5's width and
    sequence length, the same work for the transformer)."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ddpo.testing.builders import _character_clip_tokenizer

    torch.manual_seed(0)
    tokenizer = _character_clip_tokenizer(77)
    if model == "sd14":
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD14_VAE), text_encoder=CLIPTextModel(_clip_text_config(tokenizer, 768)),
            tokenizer=tokenizer, unet=UNet2DConditionModel(**SD14_UNET),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipeline = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35M_TRANSFORMER), vae=AutoencoderKL(**SD35M_VAE),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            text_encoder=CLIPTextModelWithProjection(_clip_text_config(tokenizer, 768)), tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer, 1280)), tokenizer_2=tokenizer,
            text_encoder_3=None, tokenizer_3=None)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def load_model(model: str, pretrained: Path, device, dtype, compile: bool, checkpointing: bool, resolution: int):
    """ddpo's model plugin for `model`, loaded as `ddpo run` loads it: LoRA, gradient checkpointing, compile."""
    import torch

    from ddpo.core.performance import compile_denoiser, prepare_denoiser
    from ddpo.core.plugins import get_registry

    plugin = get_registry().get("models", PLUGINS[model])
    options = {"pretrained": str(pretrained), "use_lora": True, "compile": compile, "resolution": resolution}
    if model == "sd35m":
        options["text_encoder_3"] = False
    loaded = plugin(plugin.Options(**options))
    loaded.load(device, dtype)
    loaded.configure_training()
    prepare_denoiser(loaded, checkpointing)
    compile_denoiser(loaded)
    if dtype != torch.float32:
        loaded.autocast = lambda: torch.autocast(device.type, dtype=dtype)
    return loaded


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed(device, function, repeats: int) -> float:
    """The fastest of `repeats` calls of `function`, in seconds, after one untimed call (compilation, caches)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        function()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def measure(loaded, device, batch: int, steps: int, repeats: int, flops: dict | None, gradient_saving: bool) -> dict:
    """Sampling and training throughput and peak memory of one loaded configuration (see the module docstring).
    `flops`, if given, is filled with the model FLOPs of one guided forward and one training step (eager only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ddpo.core.onpolicy import SamplingGradients
    from ddpo.core.rollout import sample_batch

    prompts, metadata = ["a photograph of an astronaut riding a horse"] * batch, [{}] * batch
    generator = torch.Generator().manual_seed(0)

    def sample(gradients=None):
        with loaded.sampling():
            if gradients is None:
                with torch.no_grad():
                    return sample_batch(loaded, prompts, metadata, num_steps=steps, eta=1.0,
                                        guidance_scale=GUIDANCE, generator=generator)
            with gradients.batch(batch):
                return sample_batch(loaded, prompts, metadata, num_steps=steps, eta=1.0, guidance_scale=GUIDANCE,
                                    generator=generator, gradients=gradients)

    loaded.denoiser.eval()
    _reset_peak(device)
    sampling_seconds = _timed(device, sample, repeats)
    sampling_peak = _peak_gb(device)
    trajectory, _ = sample()

    optimizer = torch.optim.AdamW(loaded.trainable_parameters(), lr=1e-5)
    advantages = torch.randn(batch, device=device)
    loaded.denoiser.train()

    def train_step(step: int = 0):
        transitions = trajectory.transitions(torch.full((batch,), step, dtype=torch.long, device=device))
        with loaded.autocast():
            log_prob, *_ = loaded.step_log_prob(transitions, 1.0, GUIDANCE)
        (-(advantages * log_prob.float()).mean()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_all_steps():
        for step in range(steps):
            train_step(step)

    _reset_peak(device)
    step_seconds = _timed(device, train_step, repeats)
    training_peak = _peak_gb(device)
    result = {"sampling_samples_per_s": batch / sampling_seconds, "sampling_peak_gb": sampling_peak,
              "training_samples_per_s": batch / (steps * step_seconds), "training_peak_gb": training_peak,
              "sampling_seconds": sampling_seconds, "training_step_seconds": step_seconds}
    if flops is not None and not flops:
        with FlopCounterMode(display=False) as counter, torch.no_grad(), loaded.sampling():
            transitions = trajectory.transitions(torch.zeros(batch, dtype=torch.long, device=device))
            loaded.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds, GUIDANCE)
        flops["forward"] = counter.get_total_flops() / batch
        with FlopCounterMode(display=False) as counter:
            train_step()
        flops["training_step"] = counter.get_total_flops() / batch
    if gradient_saving:
        gradients = SamplingGradients(loaded.unwrapped_denoiser(), loaded.name)
        loaded.denoiser.eval()
        _reset_peak(device)
        with_gradient = _timed(device, lambda: (sample(gradients), gradients.take()), repeats)
        gradient_peak = _peak_gb(device)
        loaded.denoiser.train()
        without = sampling_seconds + _timed(device, train_all_steps, max(1, repeats - 1))
        result.update({"gradient_from_sampling_seconds": with_gradient, "sampling_and_training_seconds": without,
                       "gradient_from_sampling_saving": 1 - with_gradient / without,
                       "gradient_from_sampling_peak_gb": gradient_peak})
    return result


def run(models: list[str], batch: int, steps: int, repeats: int, dry_run: bool) -> dict:
    import torch

    from ddpo.testing import build_tiny_sd, build_tiny_sd3

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    name = "CPU (dry run)" if dry_run else torch.cuda.get_device_name(device)
    peak = None if dry_run else peak_tflops(name)
    report = {"device": name, "cpu": cpu_model(), "torch": torch.__version__, "peak_bf16_tflops": peak,
              "batch": batch, "steps": steps, "resolution": 64 if dry_run else RESOLUTION,
              "dtype": str(dtype).removeprefix("torch."), "results": []}
    compiles = (False,) if dry_run else (False, True)
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            started = time.perf_counter()
            directory = Path(scratch) / model
            if dry_run:
                (build_tiny_sd if model == "sd14" else lambda path: build_tiny_sd3(path, with_t5=False))(directory)
            else:
                build_pipeline(model, directory)
            flops: dict = {}
            for compile in compiles:
                for checkpointing in (False, True):
                    torch.manual_seed(0)
                    loaded = load_model(model, directory, device, dtype, compile, checkpointing,
                                        report["resolution"])
                    figures = measure(loaded, device, batch, steps, repeats, flops if not compile else None,
                                      gradient_saving=not compile and not checkpointing)
                    if peak is not None and flops:
                        figures["fraction_of_peak_sampling"] = (flops["forward"] * figures["sampling_samples_per_s"]
                                                                * steps / (peak * 1e12))
                        figures["fraction_of_peak_training"] = (flops["training_step"] * steps
                                                                * figures["training_samples_per_s"] / (peak * 1e12))
                    report["results"].append({"model": model, "compile": compile,
                                              "gradient_checkpointing": checkpointing, **figures})
                    del loaded
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            report.setdefault("flops_per_sample", {})[model] = flops
            report.setdefault("model_seconds", {})[model] = time.perf_counter() - started
    return report


def table(report: dict) -> str:
    def number(value, digits: int = 2, scale: float = 1.0) -> str:
        return "-" if value is None else f"{value * scale:.{digits}f}"

    lines = [(f"{report['device']}, torch {report['torch']}, {report['dtype']}, {report['resolution']} px, batch "
              f"{report['batch']}, {report['steps']} steps, guidance {GUIDANCE}, LoRA r4; dense bf16 peak "
              f"{number(report['peak_bf16_tflops'], 0)} TFLOP/s"),
             "",
             (f"{'model':<26}{'compile':<9}{'ckpt':<6}{'sample/s':>9}{'peak GB':>9}{'%peak':>7}"
              f"{'train/s':>9}{'peak GB':>9}{'%peak':>7}{'grad-from-sampling saves':>26}")]
    for row in report["results"]:
        saving = row.get("gradient_from_sampling_saving")
        lines.append(
            f"{MODELS[row['model']]:<26}{'on' if row['compile'] else 'off':<9}"
            f"{'on' if row['gradient_checkpointing'] else 'off':<6}{number(row['sampling_samples_per_s']):>9}"
            f"{number(row['sampling_peak_gb']):>9}{number(row.get('fraction_of_peak_sampling'), 1, 100):>7}"
            f"{number(row['training_samples_per_s']):>9}{number(row['training_peak_gb']):>9}"
            f"{number(row.get('fraction_of_peak_training'), 1, 100):>7}"
            f"{'-' if saving is None else f'{saving * 100:.0f}% of the epoch':>26}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON file to write.")
    parser.add_argument("--models", default="sd14,sd35m", help="Comma-separated: sd14, sd35m.")
    parser.add_argument("--batch", type=int, default=4, help="Samples per batch.")
    parser.add_argument("--steps", type=int, default=4, help="Denoising steps timed per sample.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed repeats (the fastest counts).")
    parser.add_argument("--dry-run", action="store_true", help="Tiny pipelines on the CPU, to test the script.")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [model for model in models if model not in MODELS]
    if unknown:
        print(f"gpu_check: unknown model {', '.join(unknown)}; valid: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    import torch

    from ddpo.core.startup import quiet_bitsandbytes_kernel_warning

    quiet_bitsandbytes_kernel_warning()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; run it on a GPU machine (or --dry-run to test the script on the CPU)",
              file=sys.stderr)
        return 2
    report = run(models, args.batch, args.steps, args.repeats, args.dry_run)
    print(table(report))
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
