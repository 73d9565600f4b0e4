"""The embedded default model: a small DDPM trained by this project on scikit-learn's bundled 8x8
handwritten digits (upscaled to 16x16 RGB), shipped inside the package as safetensors.

It loads through the `ddpm` plugin's code (`DDPMPipeline.from_pretrained` on the package path), so the
offline demo exercises the same path as the real pixel-space models. `scripts/train_digits.py` rebuilds it.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import ddpo
from ddpo.plugins.models.ddpm import PixelDDPM


def shipped_digits_path() -> str:
    return str(resources.files("ddpo") / "assets" / "digits")


class Digits(PixelDDPM):
    """A 16x16 DDPM of handwritten digits shipped with ddpo: the offline, CPU, minutes-long default."""

    name = "digits"
    # Tuned so that `ddpo run` lifts the target probability from about 0.1 past 0.7 in about a minute on two CPU
    # cores: 64 samples and 2 optimizer steps per epoch, every step trained, a learning rate that moves the small
    # network within a few epochs (at 5e-4 some seeds had not reached 0.7 after 30 epochs; one optimizer step per
    # epoch, or training only half the steps, let runs collapse).
    run_defaults = {
        **PixelDDPM.run_defaults,
        "epochs": 30,
        "sample": {"batch_size": 32, "batches_per_epoch": 2, "num_steps": 20, "eta": 1.0, "guidance_scale": 1.0},
        "train": {"batch_size": 32, "grad_accum": 1, "learning_rate": 1e-3, "timestep_fraction": 1.0},
    }

    class Options(PixelDDPM.Options):
        pretrained: str = ""
        """Hub id or local directory of a DDPMPipeline; empty: the digits model shipped in the package."""
        timestep_spacing: Literal["pipeline", "leading", "trailing", "linspace"] = "trailing"
        """Spacing of the sampling timesteps. Trailing (999, 949, ..., 49) here: with the pipeline's leading
        spacing (950, ..., 50, 0) the step 50 -> 0 lands on alphas_cumprod[0] with sigma 0.01, and its
        log-prob gradient, about 17x any other step's, is noise that swamps the policy gradient (colour drift,
        runs that collapse on most targets)."""

    def pretrained_path(self) -> str:
        return self.options.pretrained or shipped_digits_path()


@ddpo.hookimpl
def register_models(register):
    register(Digits)
