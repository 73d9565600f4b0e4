"""Shared fixtures: tiny random pipelines saved to disk once per session, and two CLI runners: `run_cli`, a fresh
interpreter per command, and `forked_cli`, commands forked from a server that has done the imports
(tests/forked_cli.py).

The suite runs on pytest-xdist workers (`-n auto` in pyproject.toml), one per core; each worker and every
`ddpo` subprocess it starts uses one torch thread, unless OMP_NUM_THREADS says otherwise: on these small models
two processes of one thread do about twice the work of one process of two threads.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, for this process and its subprocesses

import pytest  # noqa: E402

from ddpo.testing import build_tiny_clip, build_tiny_ddpm, build_tiny_flux, build_tiny_sd, build_tiny_sd3, \
    build_tiny_sdxl  # noqa: E402
from forked_cli import CliServer  # noqa: E402
from helpers import SHUFFLED_REWARDS_PLUGIN, make_distribution  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory):
    return build_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def aesthetic_weights(tmp_path_factory):
    """A random LAION aesthetic MLP state dict under the public file's key names, as .pth (scaled so outputs vary)."""
    import math

    import torch

    from ddpo.plugins.rewards.aesthetic import MLP_SHAPES

    generator = torch.Generator().manual_seed(1)
    state = {key: torch.randn(shape, generator=generator) / math.sqrt(shape[-1]) for key, shape in MLP_SHAPES.items()}
    path = tmp_path_factory.mktemp("aesthetic") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ddpo ARGS` in a subprocess; returns the completed process (text output)."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpo", *args], capture_output=True, text=True, env=environment,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="session")
def forked_cli(tmp_path_factory):
    """`forked_cli.run(*args, env=..., cwd=...)`: like `run_cli`, without paying the interpreter's imports. The
    learning tests' control plugin (helpers.SHUFFLED_REWARDS_PLUGIN) is on its path, idle unless a command's
    environment sets helpers.SHUFFLE_ENV."""
    plugin = make_distribution(tmp_path_factory.mktemp("shuffled-rewards"), "shuffled_rewards",
                               SHUFFLED_REWARDS_PLUGIN)
    server = CliServer(tmp_path_factory.mktemp("forked-cli"), plugin_path=plugin)
    yield server
    server.close()
