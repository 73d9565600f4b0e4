"""Stable Diffusion 3 / 3.5 (default `stabilityai/stable-diffusion-3.5-medium`), a rectified-flow model, loaded
with diffusers' `StableDiffusion3Pipeline`.

The MMDiT transformer is the policy: LoRA adapters on its attention projections (the joint-attention ones
included, as Flow-GRPO does: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out; rank 32, alpha 64 by default) or
all its weights. Prompts are encoded by the two CLIP encoders and, if loaded, T5 (`text_encoder_3=false` skips
it: the pipeline then uses zeros in its place, and T5-XXL's 4.7B parameters, 9.5 GB in fp16, stay unloaded),
giving per-token embeddings (B, L, D) and pooled embeddings (B, P) — both travel in the trajectory as a dict.
Sampling is Flow-GRPO's SDE with the ODE's marginals (`ddpo.core.math.samplers.FlowSDESampler`), `sample.eta` being
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

from typing import Literal

import pydantic

import ddpo
from ddpo.core.plugin_api.model import classifier_free_guidance
from ddpo.core.plugin_api.text_to_image import DiffusersTextToImage, TextToImageOptions


class StableDiffusion3(DiffusersTextToImage):
    """Stable Diffusion 3/3.5 (rectified flow) from the hub or a local directory; LoRA on the transformer."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_component = "transformer"
    frozen_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out")
    run_defaults = {
        "sample": {"num_steps": 10, "eta": 0.7, "guidance_scale": 4.5},
        "eval": {"num_steps": 40},
    }

    class Options(TextToImageOptions):
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
        detach_unconditional: bool = True
        """Pass no gradient through guidance's unconditional branch in training, as Flow-GRPO does
        (train_sd3.py:190): the guided velocity's gradient is w times the conditional one's; false: both branches."""

    def pipeline_arguments(self):
        return {} if self.options.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}

    def take_components(self, pipeline):
        from ddpo.core.math.samplers import FlowSDESampler

        self.pipeline = pipeline
        self.sampler = FlowSDESampler(pipeline.scheduler)
        self.scheduler = self.sampler.scheduler

    def resolution_multiple(self):
        return self.vae_factor * self.denoiser.config.patch_size

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

    def lora_layers(self):
        from peft.utils import get_peft_model_state_dict

        transformer = self.unwrapped_denoiser()
        layers = get_peft_model_state_dict(transformer, state_dict=self.trainable_state_dict())
        # the adapter config (alpha, rank) travels in the file's metadata, so the loader scales by alpha / rank
        return {"transformer_lora_layers": layers,
                "transformer_lora_adapter_metadata": transformer.peft_config["default"].to_dict()}


@ddpo.hookimpl
def register_models(register):
    register(StableDiffusion3)
