"""Start-up: the cyclic garbage collector paused while the heavy third-party modules import and the weights load,
a reward whose weights cannot be found reported as a usage error, and a third-party warning that every start
would print dropped.

Importing torch and diffusers creates millions of long-lived objects (torch._dynamo alone pulls in sympy), and
each time the youngest generation fills, CPython's collector may walk all of them again: about a sixth of the
import time. Measured with `benchmarks/bench_startup.py`-style fresh processes (AMD EPYC, one thread, mean of
5): `import torch; from diffusers import DDPMPipeline` took 6.8 s with the collector on and 5.7 s with it off.
Nothing here is garbage-heavy, so pausing costs no memory to speak of; the collector resumes as it was.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ddpo.core.configuration.errors import UsageError

if TYPE_CHECKING:
    import torch

    from ddpo.core.plugin_api.base import Reward


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause automatic garbage collection inside the block (nested blocks are fine); restore it afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def load_reward(reward: Reward, device: torch.device, role: str = "reward") -> None:
    """`reward.load(device)`, with weights that cannot be found (a hub id with no network and no cached copy, a
    local path that does not exist or holds no such files: transformers, huggingface_hub and torch raise
    OSError for all of these) reported as one usage line naming the reward, where it is configured (`role`:
    "reward" or "eval.rewards") and its options, instead of a traceback."""
    try:
        with gc_paused():
            reward.load(device)
    except OSError as error:
        reason = " ".join(str(error).split())[:300].rstrip(".")
        options = ", ".join(f"{role}.{key}={value!r}" for key, value in reward.options.model_dump().items()
                            if isinstance(value, str) and value)
        raise UsageError(f"cannot load the weights of reward '{reward.name}' ({options or 'no options'}): "
                         f"{reason}. Give a hub id (needs the network or a cached copy) or a local "
                         f"path that holds them") from error


def quiet_bitsandbytes_kernel_warning() -> None:
    """Drop the one warning bitsandbytes logs when it is imported on a CPU with AVX512-BF16.

    diffusers imports bitsandbytes whenever it is installed (diffusers.quantizers.bitsandbytes, on the first model
    import), so with the test extras or the `8bit` extra every `ddpo run` imports it. Its CPU backend then asks the
    `kernels` package (a transformers dependency) for a 4-bit matmul kernel from the Hugging Face hub, which refuses
    the repository as untrusted, and logs "Failed to load CPU gemm_4bit_forward from kernels-community ...". ddpo
    never runs 4-bit layers (its one use of bitsandbytes, 8-bit AdamW, does not need that kernel), so the line is
    noise. Only records starting with that text are dropped; the logger's other messages still show.
    """
    logging.getLogger(BITSANDBYTES_CPU_LOGGER).addFilter(_not_kernel_warning)  # adding it twice keeps one


def _not_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BITSANDBYTES_KERNEL_WARNING)
