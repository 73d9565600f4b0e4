"""The `remote` reward: scores images by calling a reward server (`ddpo serve-reward NAME`) over HTTP.

One GPU can then hold a heavy reward (the alignment VLM, say) for every training process, and a reward that
needs another Python environment can run beside ddpo. The protocol, JSON over HTTP on 127.0.0.1:

    GET  /health -> {"reward": NAME, "options": {...}}
    POST /score  {"prompts": [...], "metadata": [{...}], "images": IMAGES} -> {"rewards": [B floats]}
                 or an HTTP error status with {"error": "..."}
    IMAGES = {"format": "png", "data": [base64 PNG, ...]}                            (8-bit, small)
           | {"format": "raw", "shape": [B, 3, H, W], "data": base64 float32 bytes}  (exact, little-endian)

A refused connection or a timeout is retried `retries` times (0.5 s, 1 s, 2 s ... apart), then fails with an
error naming the URL; an error the server reports (a bad request, the reward failing) fails at once.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Literal

import pydantic

import ddpo

FIRST_RETRY_DELAY_SECONDS = 0.5


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


def decode_images(payload: dict):
    """The protocol's IMAGES object as a float tensor (B, 3, H, W) in [0, 1]; ValueError if malformed."""
    import numpy as np
    import torch

    image_format = payload.get("format")
    if image_format == "raw":
        shape = [int(size) for size in payload["shape"]]
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"raw images must have shape (B, 3, H, W), got {shape}")
        array = np.frombuffer(base64.b64decode(payload["data"]), dtype="<f4")
        return torch.from_numpy(array.copy()).reshape(shape)
    if image_format == "png":
        from PIL import Image

        arrays = [np.asarray(Image.open(io.BytesIO(base64.b64decode(item))).convert("RGB")) for item in payload["data"]]
        if not arrays or len({array.shape for array in arrays}) != 1:
            raise ValueError("png images must be a non-empty list of images of one size")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    raise ValueError(f"unknown image format {image_format!r}; use 'png' or 'raw'")


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

    def load(self, device):
        """Check that the server answers, so a wrong URL fails before the first epoch."""
        self.served = self._request("GET", "/health", None)

    def __call__(self, images, prompts, metadata):
        body = {"prompts": list(prompts), "metadata": [dict(item) for item in metadata],
                "images": encode_images(images, self.options.image_format)}
        rewards = self._request("POST", "/score", body)["rewards"]
        return [float(value) for value in rewards]

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.options.url.rstrip("/") + path
        data = None if body is None else json.dumps(body).encode()
        failure = None
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(FIRST_RETRY_DELAY_SECONDS * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:  # the server answered: retrying would not help
                try:
                    message = json.loads(error.read()).get("error", "")
                except ValueError:
                    message = ""
                raise RemoteRewardError(f"reward server {url} answered HTTP {error.code}: "
                                        f"{message or error.reason}") from None
            except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
                failure = getattr(error, "reason", error)
        raise RemoteRewardError(f"reward server {url} did not answer after {self.options.retries + 1} attempts "
                                f"({failure}); is `ddpo serve-reward` running there?")


@ddpo.hookimpl
def register_rewards(register):
    register(Remote)
