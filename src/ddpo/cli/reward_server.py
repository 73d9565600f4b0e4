"""The reward server behind `ddpo serve-reward`: FastAPI on uvicorn, with requests scored in batches.

Imported only when that command runs (and by tests and benchmarks), so that fastapi and uvicorn, the `serve`
extra, never load with `ddpo run`. Requests from several clients are queued and scored together on one thread: it
takes the oldest waiting request, adds those arriving within `batch_window` seconds (same image size, up to
`max_batch` images in all), scores them in one call and answers each client with its own rows. Bodies are read
and decoded off the scoring thread (decoding in uvicorn's thread pool), so scoring one batch overlaps receiving the
next. The protocol is in `ddpo.plugins.rewards.remote`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ddpo.cli.flags import DEFAULT_HOST, DEFAULT_MAX_REQUEST_MB, MEBIBYTE
from ddpo.plugins.rewards.remote import TOKEN_ENV, decode_images

ROUTES = "GET /health or POST /score"
SERVER_START_SECONDS = 30


@dataclass
class _Job:
    images: Any
    prompts: list[str]
    metadata: list[dict]
    answer: asyncio.Future
    """Set from the scoring thread to (rewards, None) or (None, error message)."""

    def resolve(self, rewards: list[float] | None, error: str | None) -> None:
        try:
            self.answer.get_loop().call_soon_threadsafe(_settle, self.answer, (rewards, error))
        except RuntimeError:  # the event loop has closed: the server stopped and nobody waits for this answer
            pass


def _settle(future: asyncio.Future, value: tuple) -> None:
    if not future.done():  # a request that timed out gave up on its answer
        future.set_result(value)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: any free port); OSError when the address cannot be used."""
    family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(family, kind, protocol)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener


def parse_score_request(body: bytes) -> tuple[Any, list[str], list[dict]]:
    """A POST /score body as (images, prompts, metadata); ValueError naming what is malformed."""
    try:
        request = json.loads(body)
    except ValueError as error:
        raise ValueError(f"the body is not JSON ({error})") from None
    if not isinstance(request, dict) or "images" not in request or "prompts" not in request:
        raise ValueError("the body must be a JSON object {prompts, metadata, images}")
    prompts, metadata = request["prompts"], request.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("'prompts' must be a list of strings")
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(item, dict) for item in metadata):
        raise ValueError("'metadata' must be a list of objects")
    images = decode_images(request["images"])
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(metadata)} metadata: give one "
                         "prompt and one metadata object per image")
    return images, prompts, metadata


class RewardServer:
    """A reward behind an HTTP server on host:port, scoring queued requests in batches on one thread.

    With a `token`, every request must carry `Authorization: Bearer TOKEN` (401 otherwise). Bodies over
    `max_request_bytes` get 413 and malformed ones 400, each with {"error": "..."} saying what is wrong."""

    def __init__(self, reward, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                 max_batch: int = 64, batch_window: float = 0.05,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * MEBIBYTE, score_timeout: float = 3600.0):
        self.reward = reward
        self.token = token
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.max_request_bytes = max_request_bytes
        self.score_timeout = score_timeout
        self.batch_sizes: list[int] = []
        """Images per scoring call, in order (how well requests were batched)."""
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.socket = listening_socket(host, port)
        self.http = uvicorn.Server(uvicorn.Config(self._app(), log_level="warning", access_log=False,
                                                  lifespan="off", server_header=False))
        self.scorer = threading.Thread(target=self._score_forever, name="ddpo-reward-scorer", daemon=True)
        self.http_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.socket.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> None:
        """Serve from background threads (for tests and embedding); returns once the server accepts requests."""
        self.scorer.start()
        self.http_thread = threading.Thread(target=self.http.run, kwargs={"sockets": [self.socket]},
                                            name="ddpo-reward-http", daemon=True)
        self.http_thread.start()
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not self.http.started:
            if not self.http_thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward server on {self.url} did not start")
            time.sleep(0.01)

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM; requests already received are answered first."""
        self.scorer.start()
        try:
            self.http.run(sockets=[self.socket])
        finally:
            self.jobs.put(None)
            self.socket.close()

    def close(self) -> None:
        """Stop a server started with `start`, after answering the requests it has received."""
        self.http.should_exit = True
        if self.http_thread is not None:
            self.http_thread.join()
        self.jobs.put(None)
        self.socket.close()

    def _app(self) -> FastAPI:
        app = FastAPI(title="ddpo reward server", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(HTTPException)
        async def refuse(request: Request, error: HTTPException) -> JSONResponse:
            message = error.detail
            if error.status_code == 404:
                message = f"unknown path {request.url.path}; use {ROUTES}"
            elif error.status_code == 405:
                message = f"{request.method} {request.url.path} is not served; use {ROUTES}"
            return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

        @app.exception_handler(ClientDisconnect)
        async def client_gone(request: Request, error: ClientDisconnect) -> Response:
            return Response(status_code=400)  # nobody reads it: the client closed the connection mid-request

        @app.get("/health")
        async def health(request: Request) -> dict:
            self._authorize(request)
            return {"reward": self.reward.name, "options": self.reward.options.model_dump(mode="json")}

        @app.post("/score")
        async def score_request(request: Request) -> dict:
            try:
                self._authorize(request)
            except HTTPException:
                await self._drop_body(request)
                raise
            body = await self._read_body(request)
            try:
                images, prompts, metadata = await run_in_threadpool(parse_score_request, body)
            except ValueError as error:
                raise HTTPException(400, f"bad request: {error}") from None
            job = _Job(images, prompts, metadata, asyncio.get_running_loop().create_future())
            self.jobs.put(job)
            try:
                rewards, failure = await asyncio.wait_for(asyncio.shield(job.answer), self.score_timeout)
            except asyncio.TimeoutError:
                raise HTTPException(504, f"not scored within {self.score_timeout} s") from None
            if failure is not None:
                raise HTTPException(500, failure)
            return {"rewards": rewards}

        return app

    def _authorize(self, request: Request) -> None:
        """401 unless the server has no token or the request carries it as a bearer token."""
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise HTTPException(401, "this reward server needs a bearer token: send 'Authorization: Bearer TOKEN' "
                                     f"(the remote reward: reward.token or {TOKEN_ENV})",
                                headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise HTTPException(401, "wrong bearer token: give the one the server was started with "
                                     f"(--token or {TOKEN_ENV})", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, or 413 when it is over the limit: what comes beyond it is read and dropped (up to the
        limit again), so that a client still sending gets the answer instead of a reset connection."""
        limit = self.max_request_bytes
        declared = int(request.headers.get("content-length") or 0)  # uvicorn has checked that it is a number
        received, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if declared <= limit and size <= limit:
                received.append(chunk)
            else:
                received.clear()
                if size > 2 * limit:
                    break
        if declared > limit or size > limit:
            length = f" ({declared} bytes)" if declared > limit else ""
            raise HTTPException(413, f"request body{length} over this server's limit of {limit} bytes "
                                     f"(--max-request-mb {limit / MEBIBYTE:g}); send fewer images per request, or "
                                     "PNG instead of raw")
        if not size:
            raise HTTPException(400, "bad request: empty body; POST /score takes JSON {prompts, metadata, images}")
        return b"".join(received)

    async def _drop_body(self, request: Request) -> None:
        """Read and drop the body of a request refused before reading it (up to the size limit), so that a client
        still sending gets the answer instead of a reset connection."""
        dropped = 0
        async for chunk in request.stream():
            dropped += len(chunk)
            if dropped > self.max_request_bytes:
                break

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

        from ddpo.core.engine.rollout import score

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
                    job.resolve(None, f"reward '{self.reward.name}' failed: {type(error).__name__}: {error}")
                continue
            start = 0
            for job in batch:
                job.resolve(rewards[start:start + len(job.prompts)], None)
                start += len(job.prompts)
