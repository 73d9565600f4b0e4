"""LAION aesthetic predictor (Schuhmann et al., "improved-aesthetic-predictor"; the DDPO paper's aesthetic
reward): a linear MLP on CLIP ViT-L/14 image embeddings, trained to predict the mean human rating of an image
(SAC, LAION-Logos and AVA ratings), about 1-10.

    e = CLIP_image(x) / ||CLIP_image(x)||            (768-d, L2-normalised)
    reward = W5 W4 W3 W2 W1 e + b                    (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations)

The MLP has Dropout(0.2), Dropout(0.2), Dropout(0.1) between its first four layers (inactive here), so the
public state dict `sac+logos+ava1-l14-linearMSE.pth` holds `layers.{0,2,4,6,7}.{weight,bias}`; it loads as it
is (`.pth` only through `torch.load(..., weights_only=True)`; `.safetensors` works too).

Cost: the CLIP ViT-L/14 vision tower only (about 304M parameters: 1.2 GB in float32, 0.6 GB in float16) plus
the MLP (0.9M parameters); one forward pass at 224x224 per image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Literal

import ddpo
from ddpo.core.configuration.errors import UsageError

DEFAULT_WEIGHTS_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                       "sac%2Blogos%2Bava1-l14-linearMSE.pth")
EMBEDDING_DIM = 768
MLP_SHAPES = {
    "layers.0.weight": (1024, EMBEDDING_DIM), "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
    "layers.4.weight": (64, 128), "layers.4.bias": (64,),
    "layers.6.weight": (16, 64), "layers.6.bias": (16,),
    "layers.7.weight": (1, 16), "layers.7.bias": (1,),
}
"""Every key of the public state dict and its shape."""
DOWNLOAD_TIMEOUT_SECONDS = 60


def cache_dir() -> Path:
    """Where downloaded reward weights are kept: $XDG_CACHE_HOME/ddpo (default ~/.cache/ddpo)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpo"


def fetch_weights(location: str) -> Path:
    """A local weights file: `location` itself, or the file at URL `location` (http, https or file), downloaded
    once into `cache_dir()/rewards` and reused afterwards."""
    scheme = urllib.parse.urlparse(location).scheme
    if scheme not in ("http", "https", "file"):
        path = Path(location).expanduser()
        if not path.is_file():
            raise UsageError(f"reward weights file not found: {path}")
        return path
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)).name or "weights"
    target = cache_dir() / "rewards" / f"{hashlib.sha256(location.encode()).hexdigest()[:12]}-{name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as partial:
        try:
            with urllib.request.urlopen(location, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
                shutil.copyfileobj(response, partial)
        except (OSError, ValueError) as error:
            partial.close()
            os.unlink(partial.name)
            raise UsageError(f"cannot download reward weights from {location}: {error}; download the file "
                             "yourself and pass its path as reward.weights=PATH") from None
    os.replace(partial.name, target)  # complete files only: an interrupted download leaves no cache entry
    return target


def load_state_dict(path: Path) -> dict:
    """Tensors of a `.safetensors` file, or of a `.pth` file loaded with `weights_only=True` (no pickled code)."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot load {path} as a weights-only torch file: {' '.join(str(error).split())[:300]}") \
            from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def build_aesthetic_mlp(input_dim: int = EMBEDDING_DIM):
    """The predictor's MLP, laid out so the public state dict's keys match (dropouts at layers 1, 3, 5). ImageReward's
    head is the same MLP on its 768-d BLIP feature (`input_dim`)."""
    from torch import nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, embeddings):
            return self.layers(embeddings)

    return AestheticMLP()


def check_mlp_state_dict(state: dict, source: str) -> None:
    """A one-line error unless `state` has exactly the public keys with their shapes."""
    expected = ", ".join(f"{key} {tuple(shape)}" for key, shape in MLP_SHAPES.items())
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    if shapes != MLP_SHAPES:
        wrong = sorted(set(shapes) ^ set(MLP_SHAPES)) or sorted(k for k in MLP_SHAPES if shapes[k] != MLP_SHAPES[k])
        raise UsageError(f"{source} is not a LAION aesthetic MLP state dict (first mismatch: {wrong[0]}); "
                         f"expected exactly the keys {expected}")


class Aesthetic(ddpo.Reward):
    """LAION aesthetic score (about 1-10): linear MLP on L2-normalised CLIP ViT-L/14 image embeddings."""

    name = "aesthetic"

    class Options(ddpo.Options):
        clip_model: str = "openai/clip-vit-large-patch14"
        """CLIP whose vision tower embeds the images: a hub id or a local directory (the MLP expects ViT-L/14)."""
        weights: str = DEFAULT_WEIGHTS_URL
        """The MLP's state dict: a local .pth/.safetensors file, or a URL downloaded once into ~/.cache/ddpo."""
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
        """dtype of the CLIP tower (auto: float16 on CUDA, else float32); the MLP always runs in float32."""

    def load(self, device):
        import transformers

        from ddpo.plugins.rewards.clip_preprocessing import (ClipImagePreprocessor, dtype_kwargs, quiet_loading,
                                                             resolve_dtype)

        dtype = resolve_dtype(self.options.dtype, device)
        with quiet_loading():  # only the vision tower of a full CLIP checkpoint is loaded
            self.vision = transformers.CLIPVisionModelWithProjection.from_pretrained(
                self.options.clip_model, **dtype_kwargs(dtype)).to(device).eval()
        if self.vision.config.projection_dim != EMBEDDING_DIM:
            raise UsageError(f"reward.clip_model {self.options.clip_model} embeds images in "
                             f"{self.vision.config.projection_dim} dimensions; the aesthetic MLP expects "
                             f"{EMBEDDING_DIM} (CLIP ViT-L/14)")
        self.preprocess = ClipImagePreprocessor.from_pretrained(self.options.clip_model)
        path = fetch_weights(self.options.weights)
        state = load_state_dict(path)
        check_mlp_state_dict(state, str(path))
        self.mlp = build_aesthetic_mlp()
        self.mlp.load_state_dict(state)
        self.mlp.to(device).eval()

    def image_embeddings(self, images):
        """L2-normalised CLIP image embeddings (B, 768), float32, without gradient, for images (B, 3, H, W) in
        [0, 1]: what the MLP scores. Public so that other components (e.g. a TDPO-R critic) can share the loaded
        CLIP instead of loading a second copy; call it after `load`."""
        import torch

        with torch.no_grad():
            parameter = next(self.vision.parameters())
            pixel_values = self.preprocess(images.to(parameter.device)).to(parameter.dtype)
            embeddings = self.vision(pixel_values=pixel_values).image_embeds.float()
            return torch.nn.functional.normalize(embeddings, dim=-1)

    def __call__(self, images, prompts, metadata):
        return self.mlp(self.image_embeddings(images)).squeeze(1)


@ddpo.hookimpl
def register_rewards(register):
    register(Aesthetic)
