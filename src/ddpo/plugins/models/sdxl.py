"""Stable Diffusion XL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis", arXiv:2307.01952; default `stabilityai/stable-diffusion-xl-base-1.0`), loaded with diffusers'
`StableDiffusionXLPipeline`. Facts from diffusers 0.42 `pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py`:
penultimate hidden states and the pooled projection (:411-414), zeroed unconditional embeddings (:424), default
time ids (:1035-1036, crop (0, 0) :853), the VAE's fp16 upcast (:1264).

SDXL conditions its UNet on two text encoders — CLIP ViT-L and OpenCLIP ViT-bigG with a projection — whose
penultimate hidden states are concatenated per token (B, L, 768 + 1280), and, through its `addition_embed_type`
"text_time", on bigG's pooled, projected embedding (B, 1280) and six "time ids": original size, crop top-left
and target size, each (height, width). Here both sizes are the sampling resolution and the crop is (0, 0), as
the pipeline's defaults. Both extras go into the trajectory with the per-token embeddings, as one dict
{"prompt_embeds": (B, L, D), "pooled_prompt_embeds": (B, P), "add_time_ids": (B, 6)}, so a step's
log-probability is recomputed from what sampling used. Prompts are encoded by the pipeline's own
`encode_prompt`, and so is guidance's unconditional branch: zeros, not the empty prompt's encoding, when the
pipeline's `force_zeros_for_empty_prompt` is set (as SDXL base's is).

The UNet is the policy: LoRA adapters on its attention projections (rank `model.lora_rank`) or all its weights;
the text encoders stay frozen, and so does the VAE, kept in float32 when its config says `force_upcast` (SDXL's
VAE overflows in fp16, which the pipeline avoids the same way). Sampling is DDIM with eta built from the
pipeline's scheduler config (the hub's is an Euler scheduler with SD's betas and `steps_offset=1`), or DDPM
ancestral steps, so every DDPM-family algorithm (ddpo-is/sf, rwr, dpok, d3po, tdpo-r, grpo) runs on it as on
SD 1.x. LoRA checkpoints are also written in diffusers' format: `StableDiffusionXLPipeline.load_lora_weights(dir)`.
"""

from __future__ import annotations

import ddpo
from ddpo.core.plugin_api.model import classifier_free_guidance
from ddpo.core.plugin_api.text_to_image import TextToImageOptions
from ddpo.plugins.models.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    """Stable Diffusion XL from the hub or a local directory; LoRA on the UNet by default."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    frozen_components = ("text_encoder", "text_encoder_2", "vae")

    class Options(TextToImageOptions):
        pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
        """Hub id or local directory of a StableDiffusionXLPipeline."""

    def pipeline_arguments(self):
        return {}

    def take_components(self, pipeline):
        import torch

        self.pipeline = pipeline
        if getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)
        self.make_scheduler(pipeline.scheduler.config)

    def resolution_multiple(self):
        return 2 ** (len(self.denoiser.config.block_out_channels) - 1) * self.vae_factor

    def time_ids(self, batch_size: int):
        """(B, 6) float32: original size, crop top-left and target size, as the pipeline's defaults make them."""
        import torch

        size = (self.resolution, self.resolution)
        return torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32, device=self.device).expand(batch_size, -1)

    def encode_prompts(self, prompts):
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipeline.encode_prompt(prompts, device=self.device,
                                                               do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float(),
                "add_time_ids": self.time_ids(len(prompts))}

    def encode_negative_prompt(self):
        import torch

        with torch.no_grad():
            _, embeds, _, pooled = self.pipeline.encode_prompt([""], device=self.device,
                                                               do_classifier_free_guidance=True)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float(),
                "add_time_ids": self.time_ids(1)}

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        """The UNet's output (B, C, H, W) float32 at x_t, guided against the unconditional embeddings in one
        batched call; `prompt_embeds` is the dict `encode_prompts` makes."""
        import torch

        conditions = dict(prompt_embeds)
        batch_size = sample.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            sample, timesteps = torch.cat([sample, sample]), torch.cat([timesteps, timesteps])
            conditions = {key: torch.cat([self.negative_embeds[key].expand(batch_size, *value.shape[1:]), value])
                          for key, value in conditions.items()}
        dtype = self.unwrapped_denoiser().dtype
        embeds = conditions["prompt_embeds"].to(dtype)
        added = {"text_embeds": conditions["pooled_prompt_embeds"].to(dtype),
                 "time_ids": conditions["add_time_ids"].to(dtype)}
        with self.autocast():
            output = self.denoiser(sample.to(dtype), timesteps, encoder_hidden_states=embeds,
                                   added_cond_kwargs=added).sample.float()
        if not guided:
            return output
        return classifier_free_guidance(output, guidance_scale, self.options.detach_unconditional)


@ddpo.hookimpl
def register_models(register):
    register(StableDiffusionXL)
