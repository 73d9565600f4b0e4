"""Shared fixtures: tiny random pipelines saved to disk once per session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ddpo.testing import build_tiny_ddpm, build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory):
    return build_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm"))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m ddpo ARGS` in a subprocess; returns the completed process (text output)."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddpo", *args], capture_output=True, text=True, env=environment,
                          cwd=cwd, timeout=timeout)
