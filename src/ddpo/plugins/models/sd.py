"""Stable Diffusion 1.x / 2.x (default `CompVis/stable-diffusion-v1-4`), loaded with diffusers.

The UNet is the policy: LoRA adapters on its attention projections (peft, rank `model.lora_rank`) or all its
weights. The VAE and the text encoder stay frozen (in the mixed-precision dtype). Sampling uses DDIM with eta
(or DDPM ancestral steps), classifier-free guidance as one batched UNet call against the empty prompt.
LoRA checkpoints are also written in diffusers' format: `StableDiffusionPipeline.load_lora_weights(dir)`.
"""

from __future__ import annotations

from pathlib import Path

import pydantic

import ddpo
from ddpo.core.errors import UsageError
from ddpo.core.model import ModelOptions, classifier_free_guidance, load_pretrained

LORA_DIRECTORY = "lora"


class StableDiffusion(ddpo.Model):
    """Stable Diffusion 1.x/2.x from the hub or a local directory; LoRA on the UNet by default."""

    name = "sd14"

    class Options(ModelOptions):
        pretrained: str = "CompVis/stable-diffusion-v1-4"
        """Hub id or local directory of a StableDiffusionPipeline (any SD 1.x/2.x)."""
        resolution: int | None = pydantic.Field(None, ge=8)
        """Image size in pixels; default: the UNet's sample size x the VAE factor (512 for SD 1.4)."""
        revision: str | None = None
        """Hub revision (branch, tag or commit) to load."""
        variant: str | None = None
        """Weights variant to load, e.g. fp16."""
        detach_unconditional: bool = False
        """Pass no gradient through guidance's unconditional branch in training (Flow-GRPO's way); false: through
        both branches, as ddpo-pytorch and the DDPO/D3PO/DPOK/TDPO official code train SD 1.x."""

    def load(self, device, dtype):
        import torch

        pipeline = load_pretrained("StableDiffusionPipeline", self.options.pretrained, safety_checker=None,
                                   requires_safety_checker=False, revision=self.options.revision,
                                   variant=self.options.variant)
        self.device = device
        self.tokenizer = pipeline.tokenizer
        self.text_encoder = pipeline.text_encoder.requires_grad_(False).to(device, dtype)
        self.vae = pipeline.vae.requires_grad_(False).to(device, dtype)
        frozen_unet_dtype = dtype if self.options.use_lora else torch.float32
        self.denoiser = pipeline.unet.to(device, frozen_unet_dtype)
        self.make_scheduler(pipeline.scheduler.config)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        resolution = self.options.resolution or self.denoiser.config.sample_size * self.vae_factor
        if resolution % (8 * self.vae_factor):
            raise UsageError(f"model.resolution={resolution} must be a multiple of {8 * self.vae_factor}")
        self.resolution = resolution
        self.negative_embeds = self.encode_prompts([""])

    def sample_shape(self):
        side = self.resolution // self.vae_factor
        return (self.unwrapped_denoiser().config.in_channels, side, side)

    def encode_prompts(self, prompts):
        import torch

        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt").input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(tokens)[0]

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        import torch

        batch_size = sample.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            sample = torch.cat([sample, sample])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([self.negative_embeds.expand(batch_size, -1, -1), prompt_embeds])
        with self.autocast():
            output = self.denoiser(sample, timesteps, encoder_hidden_states=prompt_embeds).sample.float()
        if not guided:
            return output
        return classifier_free_guidance(output, guidance_scale, self.options.detach_unconditional)

    def decode(self, sample):
        import torch

        with torch.no_grad():
            images = self.vae.decode(sample.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def export_weights(self, directory: Path) -> None:
        if not self.options.use_lora:
            return
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unwrapped_denoiser(),
                                                                           state_dict=self.trainable_state_dict()))
        StableDiffusionPipeline.save_lora_weights(Path(directory) / LORA_DIRECTORY, unet_lora_layers=layers,
                                                  safe_serialization=True)


@ddpo.hookimpl
def register_models(register):
    register(StableDiffusion)
