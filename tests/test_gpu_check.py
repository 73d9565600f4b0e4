"""benchmarks/gpu_check.py cannot measure anything here (no GPU), but it must not be dead on arrival: it refuses a
CPU in one line, its inline architectures are the real ones (parameter counts, built on the meta device), its peak
table answers for the device names CUDA reports, and `--dry-run` runs every measurement on the tiny pipelines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def test_refuses_a_cpu_and_unknown_models_in_one_line(capsys):
    assert gpu_check.main(["--models", "sd14,sdxl"]) == 2
    assert capsys.readouterr().err == "gpu_check: unknown model sdxl; valid: sd14, sd35m\n"
    assert not torch.cuda.is_available()
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_inline_configs_are_the_real_architectures():
    """SD 1.4's UNet has 859,520,964 parameters and its VAE 83,653,863 (the hub's safetensors); SD3.5-Medium's
    transformer 2.24B plus its 384 x 384 x 1536 position table (2.47B values, 4.94 GB in bf16)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**gpu_check.SD14_UNET)
        vae = AutoencoderKL(**gpu_check.SD14_VAE)
        transformer = SD3Transformer2DModel(**gpu_check.SD35M_TRANSFORMER)
    assert sum(parameter.numel() for parameter in unet.parameters()) == 859_520_964
    assert sum(parameter.numel() for parameter in vae.parameters()) == 83_653_863
    values = sum(tensor.numel() for tensor in transformer.state_dict().values())
    assert 2.46e9 < values < 2.48e9 and len(transformer.transformer_blocks) == 24
    assert sum(block.attn2 is not None for block in transformer.transformer_blocks) == 13


def test_peak_table_matches_cuda_device_names():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert gpu_check.peak_tflops("NVIDIA A10") == 125
    assert gpu_check.peak_tflops("NVIDIA L40S") == 362 and gpu_check.peak_tflops("NVIDIA L4") == 121
    assert gpu_check.peak_tflops("NVIDIA GeForce RTX 4090") == 165
    assert gpu_check.peak_tflops("Tesla V100-SXM2-16GB") is None


@pytest.mark.slow
def test_dry_run_measures_every_configuration_on_tiny_pipelines(tmp_path):
    """The dry run (tiny SD and SD3 pipelines, CPU, float32, compile off) prints the table and writes a row per
    model and gradient-checkpointing setting with positive throughputs, the model FLOPs of each model, and the
    gradient-from-sampling saving on the row without checkpointing."""
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run", "--batch", "2",
                             "--steps", "2", "--repeats", "1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SD 1.4 UNet" in result.stdout and "SD3.5-Medium transformer" in result.stdout
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(row["model"], row["compile"], row["gradient_checkpointing"]) for row in rows] == [
        ("sd14", False, False), ("sd14", False, True), ("sd35m", False, False), ("sd35m", False, True)]
    for row in rows:
        assert row["sampling_samples_per_s"] > 0 and row["training_samples_per_s"] > 0
        assert ("gradient_from_sampling_saving" in row) == (not row["gradient_checkpointing"])
    for model in ("sd14", "sd35m"):
        flops = report["flops_per_sample"][model]
        assert flops["training_step"] > 1.5 * flops["forward"] > 0  # a backward pass costs about two forwards
