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

Full fine-tuning adds the optimizer's state for every weight: the second table takes one optimizer step on all
860M weights with torch's AdamW and with bitsandbytes' AdamW8bit (if installed) and reports the bytes of
state it keeps, counted tensor by tensor, and the process's peak.

    python benchmarks/bench_sd_memory.py            # gradient checkpointing off and on; optimizer state
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


def optimizer_state(name: str) -> dict:
    """Bytes of optimizer state after one step on all the UNet's weights (gradients are random: the state's
    size does not depend on them)."""
    import resource

    import torch
    from diffusers import UNet2DConditionModel

    from ddpo.core.configuration.config import TrainConfig
    from ddpo.core.engine.performance import make_optimizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    parameters = list(unet.parameters())
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter) * 1e-3
    optimizer = make_optimizer(parameters, TrainConfig(optimizer=name))
    optimizer.step()

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)

    state = sum(tensor.numel() * tensor.element_size()
                for entry in optimizer.state.values() for tensor in tensors(entry))
    return {"parameters": sum(parameter.numel() for parameter in parameters), "state": state,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(one_step(sys.argv[2] == "1")))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--optimizer":
        print(json.dumps(optimizer_state(sys.argv[2])))
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
    print("\nfull fine-tuning: optimizer state after one step on all weights (fp32 weights and gradients)\n")
    print(f"{'train.optimizer':<24} {'params':>8} {'state':>8} {'per weight':>11} {'process peak':>13}")
    for name in ("adamw", "adamw8bit"):
        output = subprocess.run([sys.executable, __file__, "--optimizer", name], capture_output=True, text=True)
        if output.returncode:
            print(f"{name:<24} not measured: {output.stderr.strip().splitlines()[-1]}")
            continue
        result = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{name:<24} {result['parameters'] / 1e6:>7.0f}M {result['state'] / GiB:>7.2f}G "
              f"{result['state'] / result['parameters']:>9.2f} B {result['peak'] / GiB:>12.2f}G")


if __name__ == "__main__":
    main()
