"""The base of diffusers text-to-image models (SD 1.x/2.x, SDXL, SD3, FLUX): what they share — loading the pipeline
with the text encoders and the VAE frozen, the image resolution, decoding, and the LoRA export in diffusers' format —
so that a model plugin states only its differences: its pipeline class, its denoiser, its sampler, how it encodes
prompts and how it predicts. Importing this module does not import torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pydantic

from ddpo.core.configuration.errors import UsageError
from ddpo.core.plugin_api.model import Model, ModelOptions, load_pretrained

if TYPE_CHECKING:
    import torch

LORA_DIRECTORY = "lora"
"""Where in a checkpoint the LoRA adapters are written in diffusers' format (the pipeline's load_lora_weights)."""


class TextToImageOptions(ModelOptions):
    """Options every diffusers text-to-image model has."""

    resolution: int | None = pydantic.Field(None, ge=8)
    """Image size in pixels; default: the model's native size, the denoiser's sample size x the VAE factor (512 for
    SD 1.4, 1024 for SDXL and SD3.5-M; FLUX: the pipeline's 1024)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    variant: str | None = None
    """Weights variant to load, e.g. fp16."""
    detach_unconditional: bool = False
    """Pass no gradient through guidance's unconditional branch in training (Flow-GRPO's way); false: through
    both branches, as ddpo-pytorch and the DDPO/D3PO/DPOK/TDPO official code train SD 1.x."""


class DiffusersTextToImage(Model):
    """A diffusers text-to-image pipeline whose denoiser is the policy; everything else in it stays frozen."""

    pipeline_class: ClassVar[str]
    """The diffusers pipeline class name, e.g. StableDiffusionPipeline."""
    denoiser_component: ClassVar[str]
    """The pipeline component that is trained: unet or transformer."""
    frozen_components: ClassVar[tuple[str, ...]] = ("text_encoder", "vae")
    """Pipeline components moved to the device in the mixed-precision dtype, without gradients (absent ones
    are skipped)."""

    class Options(TextToImageOptions):
        pass

    # -- what a subclass implements, besides encode_prompts and predict_noise -------------------------

    def pipeline_arguments(self) -> dict[str, Any]:
        """Extra keyword arguments of the pipeline's from_pretrained."""
        return {}

    def take_components(self, pipeline) -> None:
        """Keep what encoding and sampling need from the loaded pipeline; set `self.sampler` and `self.scheduler`."""
        raise NotImplementedError(f"model '{self.name}' does not implement take_components")

    def resolution_multiple(self) -> int:
        """What the resolution must be a multiple of, in pixels."""
        raise NotImplementedError(f"model '{self.name}' does not implement resolution_multiple")

    def lora_layers(self) -> dict[str, Any]:
        """The LoRA keyword arguments of the pipeline's save_lora_weights (the adapters and their metadata)."""
        raise NotImplementedError(f"model '{self.name}' does not implement lora_layers")

    def encode_negative_prompt(self) -> Any:
        """The embeddings of guidance's unconditional branch, for one sample; default: the empty prompt's."""
        return self.encode_prompts([""])

    def default_resolution(self) -> int:
        """The image size in pixels when `resolution` is not set: the denoiser's sample size x the VAE factor."""
        return self.denoiser.config.sample_size * self.vae_factor

    # -- shared ---------------------------------------------------------------------------------------

    def load(self, device, dtype):
        import torch

        pipeline = load_pretrained(self.pipeline_class, self.options.pretrained, revision=self.options.revision,
                                   variant=self.options.variant, **self.pipeline_arguments())
        self.device = device
        for name in self.frozen_components:
            module = getattr(pipeline, name, None)
            if module is not None:
                module.requires_grad_(False).to(device, dtype)
        self.vae = pipeline.vae
        denoiser = getattr(pipeline, self.denoiser_component)
        self.denoiser = denoiser.to(device, dtype if self.options.use_lora else torch.float32)
        self.take_components(pipeline)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        resolution = self.options.resolution or self.default_resolution()
        if resolution % self.resolution_multiple():
            raise UsageError(f"model.resolution={resolution} must be a multiple of {self.resolution_multiple()}")
        self.resolution = resolution
        self.negative_embeds = self.encode_negative_prompt()

    def sample_shape(self):
        side = self.resolution // self.vae_factor
        return (self.unwrapped_denoiser().config.in_channels, side, side)

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        import torch

        config = self.vae.config
        with torch.no_grad():
            latents = sample.to(self.vae.dtype) / config.scaling_factor
            if getattr(config, "shift_factor", None) is not None:
                latents = latents + config.shift_factor
            images = self.vae.decode(latents).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def export_weights(self, directory: Path) -> None:
        if not self.options.use_lora:
            return
        import diffusers

        getattr(diffusers, self.pipeline_class).save_lora_weights(Path(directory) / LORA_DIRECTORY,
                                                                  safe_serialization=True, **self.lora_layers())
