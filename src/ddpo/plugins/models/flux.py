"""FLUX.1 (default `black-forest-labs/FLUX.1-dev`; FLUX.1-schnell loads too), a rectified-flow model, loaded with
diffusers' `FluxPipeline`.

The FluxTransformer2DModel is the policy: LoRA adapters on its attention projections (the double-stream blocks'
joint ones included, as the `sd3` plugin: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; rank 32, alpha 64 by
default) or all its weights. Prompts are encoded by the pipeline's `encode_prompt`: T5's per-token embeddings
(B, L, D) and CLIP's pooled embedding (B, P), carried in the trajectory as a dict, as for SD3.

FLUX.1-dev is guidance-distilled: the guidance strength is an input of the transformer (its guidance embedding,
`sample.guidance_scale`, 3.5 by default as in the pipeline), not classifier-free guidance — one call per sample,
no unconditional branch (`detach_unconditional` has nothing to act on). FLUX.1-schnell has no guidance
embedding and ignores it.

The transformer reads latents as a sequence of 2x2 patches, (B, H/2 · W/2, 4C), with their (row, column)
positions as "image ids". The trajectory stores them unpacked, (B, C, H, W) as for every other model: packing is
a reordering of the same elements, so the flow SDE's per-element step and its mean log-probability are the same
either way, and unpacked states keep the schema's one shape, the VAE's input and diffusers' initial noise (the
pipeline draws (B, C, H, W) noise and packs it, so one generator gives both the same x_1). `predict_noise`
packs before the transformer and unpacks its velocity.

Sampling is Flow-GRPO's SDE with the ODE's marginals (`sample.sde` picks another) on FluxPipeline's own
schedule: sigmas linspace(1, 1/n, n), shifted by mu, which `calculate_shift` interpolates linearly in the
image's sequence length between the scheduler config's (base_image_seq_len, base_shift) and
(max_image_seq_len, max_shift) — 0.5 at 256 tokens, 1.15 at 4096 for FLUX.1-dev (a 1024 px image has 4096).
Run defaults: 10 sampling steps to train and 28 (the pipeline's default) to evaluate, noise level 0.7, guidance
3.5. LoRA checkpoints are also written in diffusers' format: `FluxPipeline.load_lora_weights(dir)`.

FLUX.1 has no paper (Black Forest Labs, 2024); the facts are diffusers 0.42's `pipelines/flux/pipeline_flux.py`:
`calculate_shift` (:73-83), CLIP's pooled output (:303), T5's 512 tokens (:320), default size 128 x the VAE factor
(:215), 28 steps and guidance 3.5 (:611-613), packing and image ids (:508-530), the schedule (:823-827), the
guidance input (:848) and the transformer's timestep in units of 1000 (:903).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import pydantic

import ddpo
from ddpo.core.plugin_api.text_to_image import TextToImageOptions
from ddpo.plugins.models.sd3 import StableDiffusion3

if TYPE_CHECKING:
    import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as FLUX's sequence of 2x2 patches, (B, H/2 · W/2, 4C), row-major over patches, each
    patch's channels C-major then (row, column) within it."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (B, H/2 · W/2, 4C) to (B, C, H, W)."""
    batch, _, features = packed.shape
    patches = packed.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device) -> torch.Tensor:
    """(H/2 · W/2, 3) position ids of the packed patches: (0, row, column), in `pack_latents`' order."""
    import torch

    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(device, torch.float32)


class Flux(StableDiffusion3):
    """FLUX.1 dev/schnell (rectified flow, guidance-distilled) from the hub or a local directory; LoRA on the
    transformer."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    frozen_components = ("text_encoder", "text_encoder_2", "vae")
    run_defaults = {
        "sample": {"num_steps": 10, "eta": 0.7, "guidance_scale": 3.5},
        "eval": {"num_steps": 28},
    }

    class Options(TextToImageOptions):
        pretrained: str = "black-forest-labs/FLUX.1-dev"
        """Hub id or local directory of a FluxPipeline (FLUX.1-dev or -schnell)."""
        scheduler: Literal["flow-sde"] = "flow-sde"
        """Sampler: the flow-matching SDE (sample.eta is its noise level; 0 is the deterministic Euler step)."""
        lora_rank: int = pydantic.Field(32, ge=1)
        """Rank of the LoRA adapters."""
        lora_alpha: float = pydantic.Field(64.0, gt=0)
        """LoRA alpha; the adapters' scale is alpha / rank."""
        max_sequence_length: int = pydantic.Field(512, ge=1)
        """T5 tokens per prompt (FluxPipeline's default: 512)."""

    def pipeline_arguments(self):
        return {}

    def take_components(self, pipeline):
        self.pipeline = pipeline

    def default_resolution(self):
        return 128 * self.vae_factor  # FluxPipeline's default_sample_size: 1024 px with FLUX's VAE

    def resolution_multiple(self):
        return 2 * self.vae_factor  # latents are packed in 2x2 patches

    def sample_shape(self):
        side = self.resolution // self.vae_factor
        return (self.unwrapped_denoiser().config.in_channels // 4, side, side)

    def load(self, device, dtype):
        from ddpo.core.math.samplers import FluxSampler

        super().load(device, dtype)
        side = self.resolution // self.vae_factor  # the schedule's shift depends on the resolution
        self.sampler = FluxSampler(self.pipeline.scheduler, image_seq_len=(side // 2) ** 2)
        self.scheduler = self.sampler.scheduler

    def encode_negative_prompt(self):
        """None: FLUX has no unconditional branch."""
        return None

    def encode_prompts(self, prompts):
        import torch

        with torch.no_grad():
            embeds, pooled, _ = self.pipeline.encode_prompt(prompts, prompts, device=self.device,
                                                            max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        """The velocity v (B, C, H, W) float32 at x_sigma, with `guidance_scale` as FLUX.1-dev's guidance input."""
        import torch

        transformer = self.unwrapped_denoiser()
        dtype = transformer.dtype
        batch_size, _, height, width = sample.shape
        embeds = prompt_embeds["prompt_embeds"].to(dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch_size,), float(guidance_scale), device=sample.device, dtype=dtype)
        with self.autocast():
            output = self.denoiser(
                hidden_states=pack_latents(sample).to(dtype),
                timestep=(timesteps / self.scheduler.config.num_train_timesteps).to(dtype), guidance=guidance,
                pooled_projections=prompt_embeds["pooled_prompt_embeds"].to(dtype), encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=sample.device, dtype=dtype),
                img_ids=latent_image_ids(height, width, sample.device).to(dtype)).sample
        return unpack_latents(output.float(), height, width)


@ddpo.hookimpl
def register_models(register):
    register(Flux)
