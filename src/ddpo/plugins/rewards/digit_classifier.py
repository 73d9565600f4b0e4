"""Small CNN that recognises the 16x16 handwritten digits of the embedded default demo.

It scores samples of the bundled digits DDPM (``ddpo/assets/digits``), so the RL demo can
reward "looks like digit k" fully offline. The weights are produced by
``scripts/train_digits.py`` on a training split of scikit-learn's 8x8 digits, upscaled
bilinearly to 16x16 with values in [0, 1] (white strokes on black).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

IMAGE_SIZE = 16
NUM_DIGITS = 10
NOT_A_DIGIT = 10
"""Index of the 11th class: blank fields, blobs, noise. Such images get no probability for any digit, so an
RL fine-tune cannot raise a digit's reward by drawing nothing recognisable."""
WEIGHTS_PATH = Path(__file__).resolve().parents[2] / "assets" / "digit_classifier.safetensors"


def build_digit_classifier() -> nn.Module:
    """Return the untrained network; input (B, 1, 16, 16) from :func:`preprocess`, output logits (B, 11):
    the ten digits, then "not a digit".

    Two conv stages (16->8->4) are enough for these digits while keeping a reward call
    far cheaper than the diffusion model it judges.
    """
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(128, NUM_DIGITS + 1),
    )


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Map RGB images (B, 3, H, W) in [0, 1] to the network input (B, 1, 16, 16) in [-1, 1].

    Generated images are RGB and may come at another resolution; averaging the channels
    and resizing here keeps every caller consistent with how the network was trained.
    """
    images = images.float()
    if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        images = F.interpolate(
            images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    grey = images.mean(dim=1, keepdim=True)
    return grey * 2.0 - 1.0


def load_digit_classifier(device: str | torch.device = "cpu", weights_path: str | Path | None = None) -> nn.Module:
    """Build the network and load the shipped weights (or ``weights_path``), in eval mode on ``device``."""
    model = build_digit_classifier()
    path = Path(weights_path) if weights_path is not None else WEIGHTS_PATH
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval()


@torch.no_grad()
def digit_probabilities(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Return softmax probabilities (B, 11) for images (B, 3, H, W) in [0, 1]: digits 0-9, then "not a digit"."""
    device = next(classifier.parameters()).device
    logits = classifier(preprocess(images.to(device)))
    return logits.softmax(dim=-1)
