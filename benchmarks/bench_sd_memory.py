"""Memory of one DDPO training step on the real Stable Diffusion 1.x UNet architecture, to say which setting fits
which GPU.

No weights can be downloaded here, so the UNet is built from SD 1.4's architecture (diffusers'
`UNet2DConditionModel` with SD 1.4's block widths, 64x64 latents, 77 x 768 text states) with random weights:
memory does not depend on the values. Each setting runs in a fresh process on the CPU and reports the resident
memory (`ru_maxrss`) once the weights are built and the peak of one LoRA training step of one sample (a guided
forward of 2 latents, as DDPO trains with classifier-free guidance, and its backward pass); activations grow
linearly with the batch, so the difference is the per-sample cost. fp32 only: this CPU has no native bf16 and
one emulated bf16 step takes many minutes (bf16 halves the activations and weights). On a GPU the same tensors
live in device memory, so the figures are estimates of what `torch.cuda.max_memory_allocated` would show
(CUDA's own context, about 0.5 GB, comes on top).

    python benchmarks/bench_sd_memory.py            # gradient checkpointing off and on
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from machine import cpu_model

GiB = 2**30


def one_step(checkpointing: bool) -> dict:
    import resource

    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    latents, states = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    unet(latents, torch.full((2,), 500), states).sample.mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"parameters": parameters, "loaded": loaded, "peak": peak}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(one_step(sys.argv[2] == "1")))
        return
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); SD 1.4 UNet architecture, random weights, LoRA r4,")
    print("fp32; one training step of one sample (a guided forward of 2 latents 4x64x64 and its backward)\n")
    print(f"{'gradient checkpointing':<24} {'params':>8} {'after load':>11} {'step peak':>10} {'per sample':>11}")
    for checkpointing in (False, True):
        output = subprocess.run([sys.executable, __file__, "--worker", str(int(checkpointing))],
                                capture_output=True, text=True, check=True)
        result = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{'on' if checkpointing else 'off':<24} {result['parameters'] / 1e6:>7.0f}M "
              f"{result['loaded'] / GiB:>10.2f}G {result['peak'] / GiB:>9.2f}G "
              f"{(result['peak'] - result['loaded']) / GiB:>10.2f}G")


if __name__ == "__main__":
    main()
