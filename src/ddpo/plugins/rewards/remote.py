"""The `remote` reward: scores images by calling a reward server (`ddpo serve-reward NAME`) over HTTP.

One GPU can then hold a heavy reward (the alignment VLM, say) for every training process, and a reward that
needs another Python environment can run beside ddpo. The protocol, JSON over HTTP:

    GET  /health -> {"reward": NAME, "options": {...}}
    POST /score  {"prompts": [...], "metadata": [{...}], "images": IMAGES} -> {"rewards": [B floats]}
                 or an HTTP error status with {"error": "..."}
    IMAGES = {"format": "png", "data": [base64 PNG, ...]}                            (8-bit, small)
           | {"format": "raw", "shape": [B, 3, H, W], "data": base64 float32 bytes}  (exact, little-endian)

A server started with a token answers only requests carrying `Authorization: Bearer TOKEN` (401 otherwise); it
refuses a body over its size limit with 413 and a malformed one with 400. A refused connection or a timeout is
retried `retries` times (0.5 s, 1 s, 2 s ... apart), then fails with an error naming the URL; an error the server
reports (401, 413, 400, the reward failing) fails at once, since sending the same request again would not help.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Literal

import pydantic

import ddpo

FIRST_RETRY_DELAY_SECONDS = 0.5
TOKEN_ENV = "DDPO_REWARD_TOKEN"
"""The environment variable holding the bearer token, read by `ddpo serve-reward` and by the `remote` reward."""
TOKEN_PATTERN = r"[\x21-\x7e]+"
"""A token is printable ASCII without spaces, so that it travels unchanged in an HTTP header."""


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached or reported an error."""


def encode_images(images, image_format: str) -> dict:
    """(B, 3, H, W) in [0, 1] as the protocol's IMAGES object."""
    import numpy as np
    import torch

    images = images.detach().float().clamp(0, 1).cpu()
    if image_format == "raw":
        data = images.numpy().astype("<f4").tobytes()
        return {"format": "raw", "shape": list(images.shape), "data": base64.b64encode(data).decode("ascii")}
    from PIL import Image

    encoded = []
    for array in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"format": "png", "data": encoded}


def _base64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"{where} is not valid base64 ({error})") from None


def decode_images(payload):
    """The protocol's IMAGES object as a float tensor (B, 3, H, W) in [0, 1]; ValueError naming what is malformed."""
    import numpy as np
    import torch

    if not isinstance(payload, dict):
        raise ValueError(f"'images' must be an object {{format, data[, shape]}}, got {type(payload).__name__}")
    image_format = payload.get("format")
    if image_format == "raw":
        shape = payload.get("shape")
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3
                and all(isinstance(size, int) and size > 0 for size in shape)):
            raise ValueError(f"raw images need 'shape' [B, 3, H, W] of positive integers, got {shape!r}")
        data = _base64(payload.get("data"), "images.data")
        expected = math.prod(shape) * 4
        if len(data) != expected:
            raise ValueError(f"raw images of shape {shape} need {expected} bytes of float32, images.data holds "
                             f"{len(data)}")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).reshape(shape)
    if image_format == "png":
        from PIL import Image
        from PIL.Image import DecompressionBombError, UnidentifiedImageError

        items = payload.get("data")
        if not isinstance(items, list) or not items:
            raise ValueError("png images need 'data', a non-empty list of base64 PNG files")
        arrays = []
        for index, item in enumerate(items):
            where = f"images.data[{index}]"
            try:
                with Image.open(io.BytesIO(_base64(item, where))) as image:
                    if image.format != "PNG":
                        raise ValueError(f"{where} is a {image.format} file, not a PNG")
                    arrays.append(np.asarray(image.convert("RGB")))
            except UnidentifiedImageError:
                raise ValueError(f"{where} is not an image file") from None
            except (OSError, DecompressionBombError) as error:  # a truncated file, or too many pixels
                raise ValueError(f"{where} is not a readable PNG image ({error})") from None
            if arrays[-1].shape != arrays[0].shape:
                raise ValueError(f"png images must share one size: images.data[0] is {arrays[0].shape[1]}x"
                                 f"{arrays[0].shape[0]}, {where} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    raise ValueError(f"unknown images.format {image_format!r}; use 'png' or 'raw'")


class Remote(ddpo.Reward):
    """Scores with a reward served by `ddpo serve-reward NAME` at `url` (one GPU serves many trainers)."""

    name = "remote"

    class Options(ddpo.Options):
        url: str = pydantic.Field("http://127.0.0.1:8765", pattern=r"^https?://[^/]+")
        """Base URL of the reward server (`ddpo serve-reward` prints it)."""
        timeout: float = pydantic.Field(600.0, gt=0)
        """Seconds to wait for one answer (a large VLM batch can take minutes)."""
        retries: int = pydantic.Field(2, ge=0, le=10)
        """Further attempts after a refused connection or a timeout, before giving up."""
        image_format: Literal["png", "raw"] = "png"
        """How images travel: png (8-bit, about 10x smaller) or raw float32 (exact)."""
        token: str | None = pydantic.Field(None, pattern=f"^{TOKEN_PATTERN}$")
        """Bearer token of a server started with one; unset: the DDPO_REWARD_TOKEN environment variable (which
        keeps it out of the run's config.yaml)."""

    def load(self, device):
        """Check that the server answers and takes the token, so a wrong URL or token fails before the first
        epoch."""
        self.served = self._request("GET", "/health", None)

    def __call__(self, images, prompts, metadata):
        body = {"prompts": list(prompts), "metadata": [dict(item) for item in metadata],
                "images": encode_images(images, self.options.image_format)}
        rewards = self._request("POST", "/score", body)["rewards"]
        return [float(value) for value in rewards]

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.options.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        token = self.options.token or os.environ.get(TOKEN_ENV)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        failure = None
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(FIRST_RETRY_DELAY_SECONDS * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as response:
                    answer = _json_object(response.read())
            except urllib.error.HTTPError as error:  # the server answered: retrying would not help
                message = (_json_object(error.read()) or {}).get("error") or error.reason
                raise RemoteRewardError(f"reward server {url} answered HTTP {error.code}: "
                                        + " ".join(str(message).split())) from None
            except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
                failure = getattr(error, "reason", error)
                continue
            if answer is None or (path == "/score" and not isinstance(answer.get("rewards"), list)):
                raise RemoteRewardError(f"{url} answered with something other than the reward server's JSON; "
                                        "is it a `ddpo serve-reward` server?")
            return answer
        raise RemoteRewardError(f"reward server {url} did not answer after {self.options.retries + 1} attempts "
                                f"({failure}); is `ddpo serve-reward` running there?")


def _json_object(data: bytes) -> dict | None:
    """`data` as a JSON object, or None when it is not one (an answer from something else than a reward server)."""
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@ddpo.hookimpl
def register_rewards(register):
    register(Remote)
