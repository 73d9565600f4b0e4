"""Speed and memory options, applied by the trainer around `accelerator.prepare`: channels-last weights,
gradient checkpointing, torch.compile of the denoiser and the optimizer (AdamW, or bitsandbytes' 8-bit AdamW);
and the sampling phase's own autocast precision, which `Model.sampling` applies.

Kept apart from the trainer so each option is one call there; `benchmarks/vs_trl.py` measures each one.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ddpo.core.configuration.errors import UsageError

if TYPE_CHECKING:
    from ddpo.core.configuration.config import TrainConfig
    from ddpo.core.plugin_api.model import Model

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def prepare_denoiser(model: Model, gradient_checkpointing: bool) -> None:
    """Before `accelerator.prepare`: channels-last weights (`model.channels_last`) and gradient checkpointing
    (diffusers' `enable_gradient_checkpointing`; recomputes activations in the backward pass)."""
    denoiser = model.denoiser
    if model.options.channels_last:
        denoiser.to(memory_format=torch.channels_last)
    if gradient_checkpointing:
        if not hasattr(denoiser, "enable_gradient_checkpointing"):
            raise UsageError(f"model '{model.name}' has no gradient checkpointing (its denoiser is not a diffusers "
                             "model); set train.gradient_checkpointing=false")
        denoiser.enable_gradient_checkpointing()


def compile_denoiser(model: Model) -> None:
    """After `accelerator.prepare`: `torch.compile` the (possibly DDP-wrapped) denoiser if `model.compile`.

    Compilation happens on the first calls (minutes for a large UNet); checkpoints keep the plain parameter
    names, since `Model.unwrapped_denoiser` strips the compile wrapper."""
    if model.options.compile:
        model.denoiser = torch.compile(model.denoiser)


def sampling_autocast(model: Model, device: torch.device, run_autocast):
    """The autocast context for the sampling phase's forward passes (`Model.sampling`): `model.sample_precision`,
    or the run's (`run_autocast`, accelerate's) when it is "same". The sampler's log-prob math stays float32 either way:
    models return float32 outputs, and the step runs outside autocast."""
    precision = model.options.sample_precision
    if precision == "same":
        return run_autocast
    if precision == "no":
        return contextlib.nullcontext
    dtype = PRECISIONS[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(parameters: list[torch.nn.Parameter], train: TrainConfig):
    """The policy's optimizer by `train.optimizer`: torch's AdamW, or bitsandbytes' 8-bit AdamW (optimizer
    state in 8 bits: about a quarter of AdamW's memory for the trained weights)."""
    settings = dict(lr=train.learning_rate, betas=train.adam_betas, weight_decay=train.weight_decay,
                    eps=train.adam_epsilon)
    if train.optimizer == "adamw":
        return torch.optim.AdamW(parameters, **settings)
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError("train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); "
                         "or use train.optimizer=adamw") from None
    return bitsandbytes.optim.AdamW8bit(parameters, **settings)
