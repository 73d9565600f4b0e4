"""Start-up: the cyclic garbage collector paused while the heavy third-party modules import and the weights load.

Importing torch and diffusers creates millions of long-lived objects (torch._dynamo alone pulls in sympy), and
each time the youngest generation fills, CPython's collector may walk all of them again: about a sixth of the
import time. Measured with `benchmarks/bench_startup.py`-style fresh processes (AMD EPYC, one thread, mean of
5): `import torch; from diffusers import DDPMPipeline` took 6.8 s with the collector on and 5.7 s with it off.
Nothing here is garbage-heavy, so pausing costs no memory to speak of; the collector resumes as it was.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


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
