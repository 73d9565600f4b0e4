"""Stable Diffusion 3 / 3.5 (default `stabilityai/stable-diffusion-3.5-medium`), a rectified-flow model, loaded
with diffusers' `StableDiffusion3Pipeline`.

The MMDiT transformer is the policy: LoRA adapters on its attention projections (the joint-attention ones
included, as Flow-GRPO does: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; rank 32, alpha 64 by default) or
all its weights. Prompts are encoded by the two CLIP encoders and, if loaded, T5 (`text_encoder_3=false` skips
it: the pipeline then uses zeros in its place, and T5-XXL's 4.7B parameters, 9.5 GB in fp16, stay unloaded),
giving per-token embeddings (B, L, D) and pooled embeddings (B, P) — both travel in the trajectory as a dict.
Sampling is Flow-GRPO's SDE with the ODE's marginals (`ddpo.core.samplers.FlowSDESampler`), `sample.eta` being
its noise level (0.7), on diffusers' `FlowMatchEulerDiscreteScheduler` schedule (shift from the pipeline);
classifier-free guidance is one batched call against the empty prompt, its unconditional branch detached in
training as Flow-GRPO does (`detach_unconditional`). LoRA checkpoints are also written in diffusers' format:
`StableDiffusion3Pipeline.load_lora_weights(dir)`.

The run defaults here are Flow-GRPO's sampler: 10 sampling steps for training (40 to evaluate), guidance 4.5,
noise level 0.7. Images are the transformer's native size unless `resolution` says otherwise (1024 px for
SD3.5-M); Flow-GRPO trains at 512 px with 128 T5 tokens (config/grpo.py, `resolution = 512`;
scripts/train_sd3.py, `max_sequence_length=128`), as `--preset flow-grpo-sd35` sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pydantic

import ddpo
from ddpo.core.errors import UsageError
from ddpo.core.model import ModelOptions, classifier_free_guidance, load_pretrained

LORA_DIRECTORY = "lora"


class StableDiffusion3(ddpo.Model):
    """Stable Diffusion 3/3.5 (rectified flow) from the hub or a local directory; LoRA on the transformer."""

    name = "sd3"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out")
    run_defaults = {
        "sample": {"num_steps": 10, "eta": 0.7, "guidance_scale": 4.5},
        "eval": {"num_steps": 40},
    }

    class Options(ModelOptions):
        pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
        """Hub id or local directory of a StableDiffusion3Pipeline (SD3 or SD3.5)."""
        scheduler: Literal["flow-sde"] = "flow-sde"
        """Sampler: the flow-matching SDE (sample.eta is its noise level; 0 is the deterministic Euler step)."""
        lora_rank: int = pydantic.Field(32, ge=1)
        """Rank of the LoRA adapters (Flow-GRPO: 32)."""
        lora_alpha: float = pydantic.Field(64.0, gt=0)
        """LoRA alpha; the adapters' scale is alpha / rank (Flow-GRPO: 64)."""
        text_encoder_3: bool = True
        """Load the T5 text encoder; false uses zeros in its place, as the pipeline does, and saves its memory."""
        max_sequence_length: int = pydantic.Field(256, ge=1)
        """T5 tokens per prompt."""
        resolution: int | None = pydantic.Field(None, ge=8)
        """Image size in pixels; default: the transformer's sample size x the VAE factor (1024 for SD3.5-M)."""
        revision: str | None = None
        """Hub revision (branch, tag or commit) to load."""
        variant: str | None = None
        """Weights variant to load, e.g. fp16."""
        detach_unconditional: bool = True
        """Pass no gradient through guidance's unconditional branch in training, as Flow-GRPO does
        (train_sd3.py:190): the guided velocity's gradient is w times the conditional one's; false: both branches."""

    def load(self, device, dtype):
        import torch

        from ddpo.core.samplers import FlowSDESampler

        skip_t5 = {} if self.options.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
        pipeline = load_pretrained("StableDiffusion3Pipeline", self.options.pretrained,
                                   revision=self.options.revision, variant=self.options.variant, **skip_t5)
        self.device = device
        self.pipeline = pipeline
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipeline, name)
            if module is not None:
                module.requires_grad_(False).to(device, dtype)
        self.vae = pipeline.vae
        self.denoiser = pipeline.transformer.to(device, dtype if self.options.use_lora else torch.float32)
        self.sampler = FlowSDESampler(pipeline.scheduler)
        self.scheduler = self.sampler.scheduler
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        config = self.denoiser.config
        resolution = self.options.resolution or config.sample_size * self.vae_factor
        if resolution % (self.vae_factor * config.patch_size):
            raise UsageError(f"model.resolution={resolution} must be a multiple of "
                             f"{self.vae_factor * config.patch_size}")
        self.resolution = resolution
        self.negative_embeds = self.encode_prompts([""])

    def sample_shape(self):
        side = self.resolution // self.vae_factor
        return (self.unwrapped_denoiser().config.in_channels, side, side)

    def encode_prompts(self, prompts):
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        """The velocity v (B, C, H, W) float32 at x_sigma, guided against the empty prompt in one batched call."""
        import torch

        embeds, pooled = prompt_embeds["prompt_embeds"], prompt_embeds["pooled_prompt_embeds"]
        batch_size = sample.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            negative = self.negative_embeds
            sample, timesteps = torch.cat([sample, sample]), torch.cat([timesteps, timesteps])
            embeds = torch.cat([negative["prompt_embeds"].expand(batch_size, -1, -1), embeds])
            pooled = torch.cat([negative["pooled_prompt_embeds"].expand(batch_size, -1), pooled])
        dtype = self.unwrapped_denoiser().dtype
        with self.autocast():
            output = self.denoiser(hidden_states=sample.to(dtype), timestep=timesteps.to(dtype),
                                   encoder_hidden_states=embeds.to(dtype), pooled_projections=pooled.to(dtype)).sample
        output = output.float()
        if not guided:
            return output
        return classifier_free_guidance(output, guidance_scale, self.options.detach_unconditional)

    def decode(self, sample):
        import torch

        config = self.vae.config
        with torch.no_grad():
            latents = sample.to(self.vae.dtype) / config.scaling_factor + config.shift_factor
            images = self.vae.decode(latents).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def export_weights(self, directory: Path) -> None:
        if not self.options.use_lora:
            return
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        transformer = self.unwrapped_denoiser()
        layers = get_peft_model_state_dict(transformer, state_dict=self.trainable_state_dict())
        # the adapter config (alpha, rank) travels in the file's metadata, so the loader scales by alpha / rank
        StableDiffusion3Pipeline.save_lora_weights(
            Path(directory) / LORA_DIRECTORY, transformer_lora_layers=layers, safe_serialization=True,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


@ddpo.hookimpl
def register_models(register):
    register(StableDiffusion3)
