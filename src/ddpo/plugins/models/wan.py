"""Wan2.1 text-to-video (default `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`), a rectified-flow video model, loaded with
diffusers' `WanPipeline`.

The WanTransformer3DModel is the policy: LoRA adapters on its attention projections (self- and cross-attention:
to_q/k/v, to_out.0; rank 32, alpha 64 as Flow-GRPO's Wan script, yifan123/flow_grpo@74db691 scripts/train_wan2_1.py
`transformer_lora_config`, whose other targets, add_k/q/v_proj and to_add_out, a text-to-video Wan does not have) or
all its weights. Prompts are encoded by the UMT5 encoder as the pipeline does (`WanPipeline.encode_prompt`: the
embeddings of the prompt's tokens, zeros past them), per-token embeddings (B, L, D). A video of F frames at H x W
pixels is one state x of shape (C, F', H/8, W/8) with F' = (F − 1)/4 + 1 latent frames (the VAE compresses time 4x,
keeping the first frame), so the trajectory's latents are (B, T+1, C, F', H/8, W/8).

Sampling is the flow SDE of `sample.sde` (`ddpo.core.math.samplers.FlowSDESampler`; `sample.eta` its noise level) on
`FlowMatchEulerDiscreteScheduler`'s schedule with the pipeline's shift: the hub pipeline ships a
UniPCMultistepScheduler on flow sigmas with `flow_shift` 3.0 (diffusers: 3.0 for 480p, 5.0 for 720p), a multistep ODE
solver without a per-step Gaussian, so the SDE steps on the Euler schedule of the same shifted sigmas instead (as
DanceGRPO does: XueZeyue/DanceGRPO@15cc71d fastvideo/train_grpo_wan_2_1.py:277-279 shifts linspace(1, 0)
by `--shift 3`, scripts/finetune/finetune_wan_2_1_grpo.sh:48). Classifier-free guidance is a batched call against
`negative_prompt` ("" as Flow-GRPO's train_wan2_1.py `neg_prompt_embed = compute_text_embeddings([""], ...,
max_sequence_length=512)`; the pipeline's own default is also ""), its unconditional branch detached in training as
Flow-GRPO does.

Videos decode to (B, 3, F, H, W) in [0, 1] (the latents un-normalised by the VAE's `latents_mean`/`latents_std`, as
`WanPipeline.__call__` does). Image rewards score them frame by frame: the reward of a video is the mean of its
frames' rewards (`ddpo.core.engine.rollout.score`; Flow-Factory's PickScore on videos,
X-GenGroup/Flow-Factory@a0b2bc5 src/flow_factory/rewards/pick_score.py:86-115, averages every frame the same way).
LoRA checkpoints are also written in diffusers' format: `WanPipeline.load_lora_weights(dir)`.

Run defaults are Flow-GRPO's Wan 2.1 recipe (yifan123/flow_grpo@31c71b9 config/grpo.py:35-42, `general_ocr_wan2_1`):
20 sampling steps (50 to evaluate), guidance 4.5, 33 frames at 240 x 416; the noise level is the flow SDE's 0.7. Its
training values there (KL beta 0.004, learning rate 1e-4, clip range 1e-3, lines 54-56) are the algorithm's to set
(`--set algorithm.kl_beta=0.004 ...`), not the model's.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError
from ddpo.core.plugin_api.model import classifier_free_guidance, load_pretrained
from ddpo.core.plugin_api.text_to_image import DiffusersTextToImage, TextToImageOptions


class Wan(DiffusersTextToImage):
    """Wan2.1 text-to-video (rectified flow) from the hub or a local directory; LoRA on the transformer."""

    name = "wan"
    pipeline_class = "WanPipeline"
    denoiser_component = "transformer"
    frozen_components = ("text_encoder",)
    """In the mixed-precision dtype; the VAE stays float32, as diffusers' Wan example and Flow-GRPO's
    train_wan2_1.py (`pipeline.vae.to(accelerator.device, dtype=torch.float32)`) keep it."""
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    run_defaults = {
        "sample": {"num_steps": 20, "eta": 0.7, "guidance_scale": 4.5},
        "eval": {"num_steps": 50},
    }

    class Options(TextToImageOptions):
        pretrained: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
        """Hub id or local directory of a WanPipeline (Wan2.1 text-to-video)."""
        resolution: int | None = pydantic.Field(None, ge=16)
        """Square frames of this many pixels; default: `height` x `width`."""
        height: int = pydantic.Field(240, ge=16)
        """Frame height in pixels, a multiple of 16 (Flow-GRPO: 240)."""
        width: int = pydantic.Field(416, ge=16)
        """Frame width in pixels, a multiple of 16 (Flow-GRPO: 416)."""
        num_frames: int = pydantic.Field(33, ge=1)
        """Frames per video, 4k + 1 (the VAE keeps the first frame and compresses the rest 4x; Flow-GRPO: 33)."""
        scheduler: Literal["flow-sde"] = "flow-sde"
        """Sampler: the flow-matching SDE (sample.eta is its noise level; 0 is the deterministic Euler step)."""
        flow_shift: float | None = pydantic.Field(None, gt=0)
        """Shift of the sigma schedule; default: the pipeline scheduler's (`flow_shift` 3.0 on the 1.3B hub
        model; diffusers advises 5.0 for 720p)."""
        negative_prompt: str = ""
        """The prompt of guidance's unconditional branch."""
        lora_rank: int = pydantic.Field(32, ge=1)
        """Rank of the LoRA adapters (Flow-GRPO: 32)."""
        lora_alpha: float = pydantic.Field(64.0, gt=0)
        """LoRA alpha; the adapters' scale is alpha / rank (Flow-GRPO: 64)."""
        max_sequence_length: int = pydantic.Field(512, ge=1)
        """UMT5 tokens per prompt (Flow-GRPO: 512; the pipeline's default 226)."""
        detach_unconditional: bool = True
        """Pass no gradient through guidance's unconditional branch in training, as Flow-GRPO does; false: both."""

    def load(self, device, dtype):
        import torch

        pipeline = load_pretrained(self.pipeline_class, self.options.pretrained, revision=self.options.revision,
                                   variant=self.options.variant)
        self.device = device
        for name in self.frozen_components:
            getattr(pipeline, name).requires_grad_(False).to(device, dtype)
        pipeline.vae.requires_grad_(False).to(device, torch.float32)
        self.pipeline, self.vae = pipeline, pipeline.vae
        self.denoiser = pipeline.transformer.to(device, dtype if self.options.use_lora else torch.float32)
        self.take_components(pipeline)
        options = self.options
        self.height, self.width = (options.resolution, options.resolution) if options.resolution else (
            options.height, options.width)
        multiple = self.resolution_multiple()
        if self.height % multiple or self.width % multiple:
            raise UsageError(f"model height x width = {self.height} x {self.width} must be multiples of {multiple}")
        temporal = pipeline.vae_scale_factor_temporal
        if (options.num_frames - 1) % temporal:
            raise UsageError(f"model.num_frames={options.num_frames} must be {temporal}k + 1 (e.g. "
                             f"{(options.num_frames - 1) // temporal * temporal + 1}): the VAE compresses time "
                             f"{temporal}x after the first frame")
        self.latent_frames = (options.num_frames - 1) // temporal + 1
        self.negative_embeds = self.encode_prompts([options.negative_prompt])

    def take_components(self, pipeline):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ddpo.core.math.samplers import FlowSDESampler

        config = pipeline.scheduler.config
        shift = self.options.flow_shift or config.get("flow_shift") or config.get("shift") or 1.0
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000),
                                                    shift=shift)
        self.sampler = FlowSDESampler(scheduler)
        self.scheduler = scheduler

    def resolution_multiple(self):
        return self.pipeline.vae_scale_factor_spatial * self.denoiser.config.patch_size[1]

    def sample_shape(self):
        spatial = self.pipeline.vae_scale_factor_spatial
        return (self.unwrapped_denoiser().config.in_channels, self.latent_frames, self.height // spatial,
                self.width // spatial)

    def encode_prompts(self, prompts):
        import torch

        with torch.no_grad():
            embeds, _ = self.pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                                    max_sequence_length=self.options.max_sequence_length)
        return embeds.float()

    def predict_noise(self, sample, timesteps, prompt_embeds, guidance_scale):
        """The velocity v (B, C, F', H', W') float32 at x_sigma, guided against the negative prompt in one batched
        call."""
        import torch

        batch_size = sample.shape[0]
        guided = guidance_scale > 1.0
        if guided:
            sample, timesteps = torch.cat([sample, sample]), torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([self.negative_embeds.expand(batch_size, -1, -1), prompt_embeds])
        dtype = self.unwrapped_denoiser().dtype
        with self.autocast():
            output = self.denoiser(hidden_states=sample.to(dtype), timestep=timesteps.to(dtype),
                                   encoder_hidden_states=prompt_embeds.to(dtype)).sample
        output = output.float()
        if not guided:
            return output
        return classifier_free_guidance(output, guidance_scale, self.options.detach_unconditional)

    def decode(self, sample):
        """Videos (B, 3, F, H, W) float32 in [0, 1] from final latents (B, C, F', H', W')."""
        import torch

        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        with torch.no_grad():
            latents = sample.to(self.vae.dtype)
            mean = torch.tensor(config.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
            std = torch.tensor(config.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
            videos = self.vae.decode(latents * std + mean).sample
        return (videos.float() / 2 + 0.5).clamp(0, 1)

    def lora_layers(self):
        from peft.utils import get_peft_model_state_dict

        transformer = self.unwrapped_denoiser()
        layers = get_peft_model_state_dict(transformer, state_dict=self.trainable_state_dict())
        return {"transformer_lora_layers": layers,
                "transformer_lora_adapter_metadata": transformer.peft_config["default"].to_dict()}


@ddpo.hookimpl
def register_models(register):
    register(Wan)
