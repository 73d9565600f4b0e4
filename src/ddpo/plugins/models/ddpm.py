"""Unconditional pixel-space DDPMs (google/ddpm-cifar10-32, google/ddpm-celebahq-256, google/ddpm-church-256,
or any DDPMPipeline directory), loaded with diffusers. Prompts are ignored.

The trained UNet's schedule comes from the pipeline; sampling uses DDIM built from it (eta as configured) or
DDPM ancestral steps. Built from a DDPM config, DDIM's last step lands on alpha = 1 with zero variance: that
step is deterministic and kept out of training.
"""

from __future__ import annotations

import ddpo
from ddpo.core.plugin_api.model import ModelOptions, load_pretrained


class PixelDDPM(ddpo.Model):
    """Unconditional pixel-space DDPM pipelines from the hub or a local directory; all weights trained."""

    name = "ddpm"
    conditional = False
    run_defaults = {
        "prompts": {"name": "unconditional"},
        "sample": {"guidance_scale": 1.0},
        "train": {"learning_rate": 1e-5},
        "advantage": {"per_prompt_stat_tracking": False},
    }

    class Options(ModelOptions):
        pretrained: str = "google/ddpm-cifar10-32"
        """Hub id or local directory of a DDPMPipeline."""
        use_lora: bool = False
        """Train LoRA adapters on the UNet's attention projections instead of all its weights."""

    def pretrained_path(self) -> str:
        return self.options.pretrained

    def load(self, device, dtype):
        pipeline = load_pretrained("DDPMPipeline", self.pretrained_path())
        self.device = device
        self.denoiser = pipeline.unet.to(device)
        self.make_scheduler(pipeline.scheduler.config)

    def sample_shape(self):
        config = self.unwrapped_denoiser().config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return (config.in_channels, height, width)

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        with self.autocast():
            return self.denoiser(sample, timesteps).sample.float()

    def decode(self, sample):
        return (sample.float() / 2 + 0.5).clamp(0, 1)


@ddpo.hookimpl
def register_models(register):
    register(PixelDDPM)
