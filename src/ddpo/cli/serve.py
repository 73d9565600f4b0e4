"""`ddpo serve-reward NAME`: serve any installed reward plugin over HTTP, for the `remote` reward.

On 127.0.0.1 by default; on any other address only with a bearer token (`--token` or DDPO_REWARD_TOKEN), since
anyone who reaches the port could otherwise use the GPU and read the reward's options. The server itself
(FastAPI on uvicorn, with request batching) is `ddpo.cli.reward_server`, imported only when the command runs:
this module is imported by every `ddpo` command and loads nothing heavy.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from typing import Annotated, Any

import typer

from ddpo.cli.flags import DEFAULT_HOST, DEFAULT_MAX_REQUEST_MB, MEBIBYTE
from ddpo.core.configuration.errors import UsageError
from ddpo.plugins.rewards.remote import TOKEN_ENV, TOKEN_PATTERN


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (127.0.0.0/8, ::1; `localhost`)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: what it resolves to
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except socket.gaierror as error:
        raise UsageError(f"--host {host}: cannot resolve it ({error.strerror}); give an address such as "
                         f"{DEFAULT_HOST} or 0.0.0.0 (every interface)") from None
    return all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses)


def check_access(host: str, token: str | None) -> None:
    """Refuse a token that cannot travel in a header, and any address off loopback without a token."""
    if token is not None and not re.fullmatch(TOKEN_PATTERN, token):
        raise UsageError("the token must be printable ASCII without spaces; make one with "
                         "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if token is None and not is_loopback(host):
        raise UsageError(f"--host {host} is reachable from other machines: give a token (set {TOKEN_ENV}, or "
                         f"--token), or serve on {DEFAULT_HOST}")


def register(app: typer.Typer) -> None:
    """Add `ddpo serve-reward` to the CLI."""

    @app.command("serve-reward")
    def serve_reward(
            name: Annotated[str, typer.Argument(help="Reward plugin to serve (ddpo list rewards).")],
            set_: Annotated[list[str] | None, typer.Option("--set", help="reward.KEY=VALUE option of the served "
                                                           "reward, repeatable.")] = None,
            host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface); "
                                              "off loopback a token is required.")] = DEFAULT_HOST,
            port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free port).")] = 8765,
            token: Annotated[str | None, typer.Option("--token", envvar=TOKEN_ENV, show_envvar=True,
                                                      help="Bearer token every request must carry (the "
                                                      "environment variable keeps it out of `ps`).")] = None,
            max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most images scored in one "
                                                   "call.")] = 64,
            batch_window: Annotated[float, typer.Option("--batch-window", min=0.0, help="Seconds to wait for "
                                                        "more requests to batch with the first.")] = 0.05,
            max_request_mb: Annotated[float, typer.Option("--max-request-mb", min=0.001, help="Largest request "
                                                          "body in MiB; larger ones get HTTP 413.")]
            = DEFAULT_MAX_REQUEST_MB,
            device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")] = "auto"):
        """Serve a reward plugin over HTTP for `--reward remote --set reward.url=URL`."""
        token = token or None
        check_access(host, token)
        reward = _build_reward(name, set_ or [])
        try:
            from ddpo.cli.reward_server import RewardServer
        except ImportError as error:
            raise UsageError(f"serve-reward needs fastapi and uvicorn ({error}); pip install 'ddpo[serve]'") from None
        from ddpo.core.engine.sampling import ensure_device_available
        from ddpo.core.engine.startup import load_reward

        ensure_device_available(device)
        load_reward(reward, _device(device))
        try:
            server = RewardServer(reward, host=host, port=port, token=token, max_batch=max_batch,
                                  batch_window=batch_window, max_request_bytes=int(max_request_mb * MEBIBYTE))
        except OSError as error:
            raise UsageError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
        print(f"serving reward '{name}' on {server.url}", flush=True)
        needs = f", with {TOKEN_ENV} set to the token" if token else ""
        print(f"train with: ddpo run --reward remote --set reward.url={server.url}{needs}", file=sys.stderr,
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass


def _build_reward(name: str, sets: list[str]):
    """The reward plugin `name` with the options of `--set reward.K=V`, validated by its `Options`."""
    import pydantic

    from ddpo.core.configuration.config import describe_validation_error, merge, parse_set
    from ddpo.core.plugin_api.registry import get_registry

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
