"""`ddpo serve-reward NAME`: serve any installed reward plugin over HTTP on 127.0.0.1, for the `remote` reward.

Requests from several clients are queued and scored together: the scoring thread takes the first waiting
request, adds the requests that arrive within `--batch-window` seconds (same image size, up to `--max-batch`
images in all), scores them in one call and answers each client with its own rows. The protocol is described
in `ddpo.plugins.rewards.remote`. Heavy modules load only when the command runs.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated, Any

import typer

from ddpo.core.errors import UsageError

HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 1 << 30
"""Largest request body accepted (1 GiB: 80 raw float32 images at 1024x1024)."""


@dataclass
class _Job:
    images: Any
    prompts: list[str]
    metadata: list[dict]
    done: threading.Event = field(default_factory=threading.Event)
    rewards: list[float] | None = None
    error: str | None = None


class RewardServer:
    """A reward behind an HTTP server on 127.0.0.1, scoring queued requests in batches on one thread."""

    def __init__(self, reward, port: int = 0, max_batch: int = 64, batch_window: float = 0.05,
                 score_timeout: float = 3600.0):
        self.reward = reward
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.score_timeout = score_timeout
        self.batch_sizes: list[int] = []
        """Images per scoring call, in order (how well requests were batched)."""
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.httpd = ThreadingHTTPServer((HOST, port), _handler_class(self))
        self.httpd.daemon_threads = True
        self.scorer = threading.Thread(target=self._score_forever, name="ddpo-reward-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.httpd.server_address[1]}"

    def start(self) -> threading.Thread:
        """Serve in a background thread (for tests and embedding); returns that thread."""
        self.scorer.start()
        thread = threading.Thread(target=self.httpd.serve_forever, name="ddpo-reward-http", daemon=True)
        thread.start()
        return thread

    def serve_forever(self) -> None:
        self.scorer.start()
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.jobs.put(None)

    def _next_batch(self, carried: list[_Job]) -> list[_Job] | None:
        """The next jobs to score together: the oldest waiting job and those that fit with it."""
        first = carried.pop(0) if carried else self.jobs.get()
        if first is None:
            return None
        batch, size = [first], len(first.prompts)
        deadline = time.monotonic() + self.batch_window
        while size < self.max_batch:
            if carried:
                job = carried.pop(0)
            else:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if job is None:
                self.jobs.put(None)
                break
            if job.images.shape[1:] != first.images.shape[1:] or size + len(job.prompts) > self.max_batch:
                carried.append(job)
                break
            batch.append(job)
            size += len(job.prompts)
        return batch

    def _score_forever(self) -> None:
        import torch

        from ddpo.core.rollout import score

        carried: list[_Job] = []
        while (batch := self._next_batch(carried)) is not None:
            images = torch.cat([job.images for job in batch])
            prompts = [prompt for job in batch for prompt in job.prompts]
            metadata = [item for job in batch for item in job.metadata]
            self.batch_sizes.append(len(prompts))
            try:
                rewards = score(self.reward, images, prompts, metadata).tolist()
            except Exception as error:  # the clients get the error; the server keeps serving
                for job in batch:
                    job.error = f"reward '{self.reward.name}' failed: {type(error).__name__}: {error}"
                    job.done.set()
                continue
            start = 0
            for job in batch:
                job.rewards = rewards[start:start + len(job.prompts)]
                start += len(job.prompts)
                job.done.set()


def _handler_class(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # one line per request would drown the output
            pass

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") != "/health":
                return self._answer(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})
            self._answer(200, {"reward": server.reward.name,
                               "options": server.reward.options.model_dump(mode="json")})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                return self._answer(404, {"error": f"unknown path {self.path}; use POST /score"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_REQUEST_BYTES:
                return self._answer(413, {"error": f"request body of {length} bytes; expected 1 to "
                                                   f"{MAX_REQUEST_BYTES}"})
            from ddpo.plugins.rewards.remote import decode_images

            try:
                body = json.loads(self.rfile.read(length))
                images = decode_images(body["images"])
                prompts = [str(prompt) for prompt in body["prompts"]]
                metadata = [dict(item) for item in body.get("metadata") or [{} for _ in prompts]]
                if not len(prompts) == len(metadata) == len(images):
                    raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata")
            except (KeyError, TypeError, ValueError, OSError) as error:
                return self._answer(400, {"error": f"bad request: {type(error).__name__}: {error}"})
            job = _Job(images, prompts, metadata)
            server.jobs.put(job)
            if not job.done.wait(server.score_timeout):
                return self._answer(504, {"error": f"not scored within {server.score_timeout} s"})
            if job.error is not None:
                return self._answer(500, {"error": job.error})
            self._answer(200, {"rewards": job.rewards})

    return Handler


def register(app: typer.Typer) -> None:
    """Add `ddpo serve-reward` to the CLI."""

    @app.command("serve-reward")
    def serve_reward(
            name: Annotated[str, typer.Argument(help="Reward plugin to serve (ddpo list rewards).")],
            set_: Annotated[list[str] | None, typer.Option("--set", help="reward.KEY=VALUE option of the served "
                                                           "reward, repeatable.")] = None,
            port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                              help="Port on 127.0.0.1 (0: any free port).")] = 8765,
            max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most images scored in one "
                                                   "call.")] = 64,
            batch_window: Annotated[float, typer.Option("--batch-window", min=0.0, help="Seconds to wait for "
                                                        "more requests to batch with the first.")] = 0.05,
            device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto"):
        """Serve a reward plugin over HTTP on 127.0.0.1 for `--reward remote --set reward.url=URL`."""
        reward = _build_reward(name, set_ or [])
        from ddpo.core.sampling import ensure_device_available

        ensure_device_available(device)
        reward.load(_device(device))
        try:
            server = RewardServer(reward, port=port, max_batch=max_batch, batch_window=batch_window)
        except OSError as error:
            raise UsageError(f"cannot listen on {HOST}:{port}: {error.strerror or error}") from None
        print(f"serving reward '{name}' on {server.url}", flush=True)
        print(f"train with: ddpo run --reward remote --set reward.url={server.url}", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def _build_reward(name: str, sets: list[str]):
    """The reward plugin `name` with the options of `--set reward.K=V`, validated by its `Options`."""
    import pydantic

    from ddpo.core.config import describe_validation_error, merge, parse_set
    from ddpo.core.plugins import get_registry

    options: dict[str, Any] = {}
    for assignment in sets:
        nested = parse_set(assignment)
        if set(nested) != {"reward"} or not isinstance(nested["reward"], dict):
            raise UsageError(f"serve-reward takes --set reward.KEY=VALUE, got '{assignment}'")
        options = merge(options, nested["reward"])
    cls = get_registry().get("rewards", name)
    try:
        return cls(cls.Options.model_validate(options))
    except pydantic.ValidationError as error:
        raise UsageError(describe_validation_error(error, cls.Options, prefix="reward")
                         + f" (options of reward '{name}')") from None


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
