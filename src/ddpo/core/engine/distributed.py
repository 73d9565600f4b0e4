"""Sharded training through accelerate (FSDP2, DeepSpeed ZeRO-2/3): the accelerator, and whole tensors from and to
sharded ones.

Under FSDP2 every parameter of a prepared module is a DTensor holding this process's shard, and so is every
optimizer state tensor of it. Checkpoints keep the format of an unsharded run (whole tensors, the optimizer's
own `state_dict` layout): saving gathers each tensor (`full_tensor`, a collective: every rank calls it) and
loading cuts each rank's shard out of the whole tensor it read (no communication). So a checkpoint written
under FSDP resumes under DDP or on one process, and the other way round.

accelerate applies FSDP only on accelerator devices (its `AcceleratorState` picks FSDP for MULTI_GPU-like
types, accelerate/state.py:947-977 in 1.16): on CPU processes (gloo) the launcher's FSDP settings would be
ignored and the run would silently be plain data parallel. `make_accelerator` turns accelerate's FSDP on for
them, which is how the test suite exercises the sharded code paths on a machine without GPUs.

Under DeepSpeed (ZeRO-2: gradients and optimizer state partitioned; ZeRO-3: the weights too) the prepared denoiser
is DeepSpeed's engine, which clips and steps inside its backward pass at a gradient-accumulation boundary.
ddpo's algorithms decide per epoch how many backward passes make one step, so `make_accelerator` fixes the
engine's own count at 1 and the accumulator (ddpo.core.engine.optim) tells the engine, before each backward
pass, whether it ends an optimizer step (accelerate's `DeepSpeedEngineWrapper.backward(sync_gradients=...)`,
which sets `engine.set_gradient_accumulation_boundary`); the clipping norm is `train.max_grad_norm`. ZeRO's
optimizer state is partitioned per rank in its own flat layout, so checkpoints keep DeepSpeed's own per-rank
files (ddpo.core.engine.checkpoint) and resume with the same number of processes. accelerate applies DeepSpeed
only without its `cpu` flag (accelerate/state.py:935 in 1.16), so CPU processes start without it and with gloo
named as the backend (accelerate finds none on a machine without GPUs, state.py:747-756, and would count one
process); DeepSpeed's own CPU accelerator then runs them, which is how the test suite exercises ZeRO here.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import torch

from ddpo.core.configuration.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ddpo.core.configuration.config import RunConfig


def _launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(config: RunConfig) -> Accelerator:
    """The run's accelerator, from the launcher's environment; FSDP2 also on CPU processes, DeepSpeed stepping at
    the boundaries ddpo sets (module docstring). Refuses FSDP1 and what ddpo does not do under sharding, in one
    line each."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    if not torch.cuda.is_available():  # where deepspeed is installed, accelerate imports it, which warns without
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a GPU unless told it runs on the CPU
    if _launched_with_deepspeed():
        check_deepspeed_config(config)
        # without a GPU accelerate finds no backend and would count one process: name gloo, DeepSpeed's on the CPU
        handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(mixed_precision=config.mixed_precision, deepspeed_plugin=_deepspeed_plugin(config),
                                  kwargs_handlers=handlers)
        # accelerate hands the ZeRO config to transformers whatever zero3_init_flag says, and under ZeRO-3
        # transformers would then build its models (the text encoders, which the engine never wraps) partitioned
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return accelerator
    if _launched_with_fsdp():
        check_sharded_config(config)
    accelerator = Accelerator(cpu=config.device == "cpu", mixed_precision=config.mixed_precision)
    if _launched_with_fsdp() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if config.mixed_precision != "no":
            plugin.set_mixed_precision(config.mixed_precision)
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def check_sharded_config(config: RunConfig) -> None:
    """What a sharded run cannot do (FSDP1's flat parameters among it), refused before anything loads."""
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UsageError("ddpo shards with FSDP2 only; set fsdp_version: 2 in the accelerate config "
                         "(ddpo launch-config fsdp prints the path of one)")
    if config.train.gradient_from_sampling:
        raise UsageError("train.gradient_from_sampling swaps the LoRA matrices for per-sample copies, which FSDP's "
                         "shards cannot hold; set train.gradient_from_sampling=false or train without FSDP")


def _deepspeed_plugin(config: RunConfig):
    """accelerate's DeepSpeed settings from the launcher's environment, with the engine's own accumulation count 1
    (ddpo sets each boundary), its clipping norm `train.max_grad_norm` and its nominal micro-batch
    `train.batch_size` (DeepSpeed wants one; ddpo hands no data loader to accelerate)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin()
    settings = plugin.deepspeed_config
    if settings.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise UsageError("ddpo decides how many backward passes make an optimizer step (train.grad_accum); set "
                         "gradient_accumulation_steps: 1 in the DeepSpeed config")
    if plugin.zero3_init_flag:
        raise UsageError("zero3_init_flag: true would build every model partitioned, the text encoders outside "
                         "DeepSpeed's engine among them; set zero3_init_flag: false in the accelerate config")
    settings.update(gradient_accumulation_steps=1, gradient_clipping=config.train.max_grad_norm,
                    train_micro_batch_size_per_gpu=config.train.batch_size)
    settings.pop("train_batch_size", None)
    return plugin


def check_deepspeed_config(config: RunConfig) -> None:
    """What ddpo does not do under DeepSpeed, refused before anything loads."""
    if config.device == "mps" or (config.device == "cpu" and torch.cuda.is_available()):
        raise UsageError(f"under DeepSpeed the processes run on the GPUs, or on the CPU where there is none; "
                         f"device '{config.device}' is neither (use --device auto)")
    if config.train.gradient_from_sampling:
        raise UsageError("train.gradient_from_sampling hands its gradients to the optimizer itself, which "
                         "DeepSpeed's engine does not take; set train.gradient_from_sampling=false or shard with "
                         "--distributed fsdp")
    if config.train.ema_decay > 0:
        raise UsageError("train.ema_decay averages whole weights, which ZeRO partitions; set train.ema_decay=0 or "
                         "shard with --distributed fsdp")


def deepspeed_engine(accelerator: Accelerator):
    """DeepSpeed's engine the accelerator prepared the policy into, or None without DeepSpeed."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


@contextlib.contextmanager
def gathered_parameters(parameters: list[torch.nn.Parameter]):
    """Inside, ZeRO-3's partitioned parameters among `parameters` hold their whole tensors (a collective: every rank
    enters, with the same parameters); other parameters are left as they are."""
    partitioned = [parameter for parameter in parameters if hasattr(parameter, "ds_tensor")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):
        yield


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (every rank must call this for the same tensors, in the same order), or the
    tensor itself; detached."""
    tensor = tensor.detach()
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor, cut to this rank's shard the way `reference` (a DTensor parameter) is; a tensor
    of another shape (e.g. a step count) or a plain `reference` leaves it as it is."""
    if not is_sharded(reference) or is_sharded(value) or value.shape != reference.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                             reference.placements, src_data_rank=None)


def optimizer_state(optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every shard replaced by its whole tensor, on the CPU (a collective under
    FSDP: call on every rank)."""
    state = optimizer.state_dict()
    state["state"] = {index: {key: whole(value).cpu() if isinstance(value, torch.Tensor) else value
                              for key, value in entries.items()}
                      for index, entries in state["state"].items()}
    return state


def load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """Load a state of `optimizer_state` (or a plain `state_dict`), each tensor cut to this rank's shard of its
    parameter."""
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    state = {**state, "state": {index: {key: shard_like(parameters[int(index)], value)
                                        if isinstance(value, torch.Tensor) else value
                                        for key, value in entries.items()}
                                for index, entries in state["state"].items()}}
    optimizer.load_state_dict(state)
