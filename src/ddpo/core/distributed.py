"""Sharded training (FSDP2 through accelerate): the accelerator, and whole tensors from and to sharded ones.

Under FSDP2 every parameter of a prepared module is a DTensor holding this process's shard, and so is every
optimizer state tensor of it. Checkpoints keep the format of an unsharded run (whole tensors, the optimizer's
own `state_dict` layout): saving gathers each tensor (`full_tensor`, a collective: every rank calls it) and
loading cuts each rank's shard out of the whole tensor it read (no communication). So a checkpoint written
under FSDP resumes under DDP or on one process, and the other way round.

accelerate applies FSDP only on accelerator devices (its `AcceleratorState` picks FSDP for MULTI_GPU-like
types, accelerate/state.py:947-977 in 1.16): on CPU processes (gloo) the launcher's FSDP settings would be
ignored and the run would silently be plain data parallel. `make_accelerator` turns accelerate's FSDP on for
them, which is how the test suite exercises the sharded code paths on a machine without GPUs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from ddpo.core.errors import UsageError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ddpo.core.config import RunConfig


def _launched_with_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(config: RunConfig) -> Accelerator:
    """The run's accelerator, from the launcher's environment; FSDP2 also on CPU processes (module docstring).
    Refuses FSDP1 and what ddpo does not do under sharding, in one line each."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise UsageError("ddpo's trainer does not drive DeepSpeed's engine yet (it steps on every backward pass and "
                         "partitions the optimizer state per rank); shard with --distributed fsdp instead")
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
