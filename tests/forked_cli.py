"""`ddpo` commands forked from a process that has already imported torch, diffusers and ddpo.

Each command still runs as its own process through the real entry point (`ddpo.cli.main`), with its own
environment, working directory, stdout, stderr and exit code; only the interpreter start-up and the imports
every run pays (about 7 CPU seconds here) are done once per test worker instead of once per command. Tests whose
subject is start-up itself (lazy imports, the README's first command) or plugin discovery through PYTHONPATH
(the server's registry sees the server's path) use `conftest.run_cli`, a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SERVER = r'''
"""Read a JSON job per line ({"argv", "env", "cwd", "stdout", "stderr"}), fork, run ddpo.cli.main(argv) in the
child with its output in the given files, and print {"returncode"} per job."""
import json
import os
import signal
import sys

import diffusers  # noqa: F401 - the imports every run pays, done once
import ddpo.core.engine.trainer  # noqa: F401
from diffusers import DDIMScheduler, DDPMPipeline, StableDiffusionPipeline, UNet2DModel  # noqa: F401
from ddpo.cli import main

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(job["env"])
        if job["cwd"]:
            os.chdir(job["cwd"])
        for stream, path in ((2, job["stderr"]), (1, job["stdout"])):
            with open(path, "w") as target:
                os.dup2(target.fileno(), stream)
        sys.stdin.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = 0
        try:
            main(job["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
'''


class CliServer:
    """A server process forking `ddpo` commands; `plugin_path` goes on its PYTHONPATH (a plugin every command
    sees)."""

    def __init__(self, work: Path, plugin_path: Path | None = None):
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if plugin_path is not None:
            environment["PYTHONPATH"] = str(plugin_path)
        self.process = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=environment)
        self.work = work
        self.jobs = 0

    def run(self, *argv: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
        """Run `ddpo ARGV` with extra environment variables in `cwd`; returns the completed process (text output),
        as `conftest.run_cli` does."""
        self.jobs += 1
        stdout, stderr = self.work / f"job{self.jobs}.stdout", self.work / f"job{self.jobs}.stderr"
        job = {"argv": list(argv), "env": env or {}, "cwd": str(cwd) if cwd else None, "stdout": str(stdout),
               "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        assert answer, "the CLI server died"
        return subprocess.CompletedProcess(["ddpo", *argv], json.loads(answer)["returncode"], stdout.read_text(),
                                           stderr.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
