"""Stable Diffusion 1.x / 2.x (default `CompVis/stable-diffusion-v1-4`), loaded with diffusers.

The UNet is the policy: LoRA adapters on its attention projections (peft, rank `model.lora_rank`) or all its
weights. The VAE and the text encoder stay frozen (in the mixed-precision dtype). Sampling uses DDIM with eta
(or DDPM ancestral steps), classifier-free guidance as one batched UNet call against the empty prompt.
LoRA checkpoints are also written in diffusers' format: `StableDiffusionPipeline.load_lora_weights(dir)`.
"""

from __future__ import annotations

import ddpo
from ddpo.core.plugin_api.model import classifier_free_guidance
from ddpo.core.plugin_api.text_to_image import DiffusersTextToImage, TextToImageOptions


class StableDiffusion(DiffusersTextToImage):
    """Stable Diffusion 1.x/2.x from the hub or a local directory; LoRA on the UNet by default."""

    name = "sd14"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_component = "unet"

    class Options(TextToImageOptions):
        pretrained: str = "CompVis/stable-diffusion-v1-4"
        """Hub id or local directory of a StableDiffusionPipeline (any SD 1.x/2.x)."""

    def pipeline_arguments(self):
        return {"safety_checker": None, "requires_safety_checker": False}

    def take_components(self, pipeline):
        self.tokenizer = pipeline.tokenizer
        self.text_encoder = pipeline.text_encoder
        self.make_scheduler(pipeline.scheduler.config)

    def resolution_multiple(self):
        return 8 * self.vae_factor  # the UNet halves the latent three times

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

    def lora_layers(self):
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(self.unwrapped_denoiser(), state_dict=self.trainable_state_dict())
        return {"unet_lora_layers": convert_state_dict_to_diffusers(layers)}


@ddpo.hookimpl
def register_models(register):
    register(StableDiffusion)
