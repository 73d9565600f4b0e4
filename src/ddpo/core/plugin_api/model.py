"""The model plugin base class: what the rollout engine and the algorithms ask of a diffusion model.

A model plugin loads its pipeline in `load`, sets `self.denoiser` (the network being trained) and
`self.sampler` (a `ddpo.core.math.samplers.Sampler`: DDIM, DDPM or the flow-matching SDE, around the pipeline's
diffusers scheduler, also kept as `self.scheduler`), and implements `encode_prompts`, `predict_noise` and
`decode`. Stepping with log-probabilities, the reference policy, LoRA, and saving/loading the trained weights
are shared here. Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pydantic

from ddpo.core.configuration.errors import UsageError
from ddpo.core.engine.startup import gc_paused
from ddpo.core.plugin_api.base import Options, Plugin

if TYPE_CHECKING:
    import torch

    from ddpo.core.plugin_api.schema import Transitions

TRAINABLE_WEIGHTS = "weights.safetensors"


class ModelOptions(Options):
    """Options every model plugin has."""

    pretrained: str = ""
    """Hub id or local directory of the diffusers pipeline to start from."""
    use_lora: bool = True
    """Train LoRA adapters on the denoiser's attention projections instead of all its weights."""
    lora_rank: int = pydantic.Field(4, ge=1)
    """Rank of the LoRA adapters."""
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    """Sampler: DDIM with `sample.eta` (1.0 is fully stochastic), or DDPM ancestral steps (eta ignored)."""
    timestep_spacing: Literal["pipeline", "leading", "trailing", "linspace"] = "pipeline"
    """Spacing of the DDIM/DDPM sampling timesteps (diffusers' `timestep_spacing`); pipeline: as its scheduler
    config says. "trailing" ends on t = T/n - 1 instead of 0, so no stochastic step lands on the nearly
    noiseless alphas_cumprod[0]."""
    compile: bool = False
    """torch.compile the denoiser in training runs (the first epoch pays the compilation)."""
    channels_last: bool = False
    """Keep the denoiser's weights in channels-last memory format (faster convolutions on many GPUs)."""
    sample_precision: Literal["same", "no", "fp16", "bf16"] = "same"
    """Autocast dtype of the sampling phase's forward passes ("same": the run's mixed_precision); the log-prob
    math stays float32. Lower precision samples faster where the hardware has it, but moves the sampled
    log-probs away from the training pass's, which PPO's clip counts as a policy change."""


class Model(Plugin):
    """A diffusion model the trainer can sample from and fine-tune."""

    kind = "model"
    conditional: ClassVar[bool] = True
    """Whether the model reads prompts (unconditional models get empty prompts and no guidance)."""
    run_defaults: ClassVar[dict[str, Any]] = {}
    """Run-config values that suit this model, applied over the built-in defaults and under the user's."""
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    class Options(ModelOptions):
        pass

    def __init__(self, options=None):
        super().__init__(options)
        self.denoiser = None
        self.scheduler = None
        """The diffusers scheduler (the schedule's source); stepping goes through `self.sampler`."""
        self.sampler = None
        """A `ddpo.core.math.samplers.Sampler` around `self.scheduler`."""
        self.device = None
        self.autocast = contextlib.nullcontext
        """Context for denoiser forward passes; the trainer sets it to the accelerator's autocast."""
        self._gathered = None
        """Inside `gathered_weights`, the whole trainable weights."""

    # -- what a plugin implements -------------------------------------------------------------------

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        """Load the pipeline onto `device`; frozen parts may use `dtype` (the mixed-precision dtype)."""
        raise NotImplementedError(f"model '{self.name}' does not implement load")

    def sample_shape(self) -> tuple[int, ...]:
        """The shape S of one state x_t in the model's space: (C, H, W) for images, (C, F, H, W) for videos."""
        raise NotImplementedError(f"model '{self.name}' does not implement sample_shape")

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor | None:
        """(B, L, D) prompt embeddings, or None for an unconditional model."""
        return None

    def predict_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor | None,
                      guidance_scale: float) -> torch.Tensor:
        """(B, *S) float32 model output for x_t (B, *S) (e.g. (B, C, H, W)) at timesteps (B,), guided if the model is
        conditional and guidance_scale > 1 (unconditional and conditional halves in one batched call)."""
        raise NotImplementedError(f"model '{self.name}' does not implement predict_noise")

    def decode(self, sample: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) float32 in [0, 1] from final states x_0 (B, *S); a video model's videos
        (B, 3, F, H, W), which rewards score frame by frame (`ddpo.core.engine.rollout.score`)."""
        raise NotImplementedError(f"model '{self.name}' does not implement decode")

    def export_weights(self, directory: Path) -> None:
        """Write the trained weights in the format the model's own ecosystem loads (e.g. diffusers LoRA)."""

    # -- shared mechanics ---------------------------------------------------------------------------

    def make_scheduler(self, scheduler_config) -> None:
        """Set `self.scheduler` (the diffusers scheduler) and `self.sampler` from a scheduler config, by
        `options.scheduler` (DDIM or DDPM) and `options.timestep_spacing`."""
        from diffusers import DDIMScheduler, DDPMScheduler

        from ddpo.core.math.samplers import DDIMSampler, DDPMSampler

        spacing = self.options.timestep_spacing
        if spacing != "pipeline":
            scheduler_config = {**scheduler_config, "timestep_spacing": spacing}
        if self.options.scheduler == "ddim":
            self.sampler = DDIMSampler(DDIMScheduler.from_config(scheduler_config))
        else:
            self.sampler = DDPMSampler(DDPMScheduler.from_config(scheduler_config))
        self.scheduler = self.sampler.scheduler

    def use_sde(self, sde: str) -> None:
        """Step with the flow SDE `sde` (`sample.sde`); call after `load`. flow-grpo (the default) is a no-op on
        any sampler; the others need the flow-matching sampler (the config check refuses them elsewhere)."""
        if sde == "flow-grpo" and getattr(self.sampler, "kind", "") != "flow-sde":
            return
        if getattr(self.sampler, "kind", "") != "flow-sde":
            raise ValueError(f"sample.sde={sde} needs a flow-matching sampler, not '{self.sampler.kind}'")
        from ddpo.core.math.logprob import FLOW_SDE_STEPS

        if sde not in FLOW_SDE_STEPS:
            raise ValueError(f"unknown flow SDE '{sde}'; valid: {', '.join(FLOW_SDE_STEPS)}")
        self.sampler.sde = sde

    def set_timesteps(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Configure the sampler for `num_steps` steps: `(timesteps, prev_timesteps)`, each (T,), first to
        last — each step's time and the time it lands on, which the rollout records."""
        return self.sampler.set_timesteps(num_steps, self.device)

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """x_T for `batch_size` samples: (B, *S) standard normal scaled by the sampler's initial sigma."""
        import torch

        noise = torch.randn((batch_size, *self.sample_shape()), generator=generator, dtype=torch.float32)
        return noise.to(self.device) * self.sampler.init_noise_sigma

    def step(self, model_output: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
             sample: torch.Tensor, eta: float, prev_sample: torch.Tensor | None = None,
             generator: torch.Generator | None = None):
        """One sampler step with its log-probability: `(prev_sample, log_prob, mean, std)` (see core.samplers)."""
        return self.sampler.step(model_output, timesteps, prev_timesteps, sample, eta, prev_sample=prev_sample,
                                 generator=generator)

    def step_log_prob(self, transitions: Transitions, eta: float, guidance_scale: float):
        """Log-probability (B,) of each transition's action under the current weights, with gradient; inside
        `reference()`, under the pretrained model. Uses only what the trajectory recorded for the step.

        Returns `(log_prob, mean, std, model_output)`: (B,), (B, *S), (B|1, 1, ..., 1), (B, *S).
        """
        if transitions.prev_timesteps is None:
            raise ValueError("the transitions carry no prev_timesteps; sample trajectories with "
                             "ddpo.core.engine.rollout.sample_batch, which records them")
        output = self.predict_noise(transitions.sample, transitions.timesteps, transitions.prompt_embeds,
                                    guidance_scale)
        _, log_prob, mean, std = self.step(output, transitions.timesteps, transitions.prev_timesteps,
                                           transitions.sample, eta, prev_sample=transitions.next_sample)
        return log_prob, mean, std, output

    def denoising_loss(self, original: torch.Tensor, prompt_embeds, generator: torch.Generator,
                       guidance_scale: float = 1.0) -> torch.Tensor:
        """The model's own training loss on clean states x_0 (B, C, H, W): fresh noise and a uniform time per
        sample, the target as the sampler says (epsilon, v or x_0 by the scheduler's `prediction_type`; the
        velocity for flow matching), the prediction guided with `guidance_scale` (1: none). Returns (B,) float32,
        the per-sample mean squared error."""
        import torch

        original = original.to(torch.float32)
        noise = torch.randn(original.shape, generator=generator, dtype=torch.float32).to(original.device)
        noisy, timesteps, target = self.sampler.denoising_target(original, noise, generator)
        output = self.predict_noise(noisy, timesteps, prompt_embeds, guidance_scale=guidance_scale)
        return ((output - target) ** 2).mean(dim=tuple(range(1, output.ndim)))

    # -- the reference policy (the pretrained model) --------------------------------------------------

    def prepare_reference(self) -> None:
        """Make the pretrained model available to `reference()`; called once by the trainer, before training,
        when the algorithm says `needs_reference`. With LoRA this costs nothing (the adapters are switched off);
        with all weights trained it keeps a frozen copy of the denoiser (its size again in memory)."""
        import copy

        if self.options.use_lora:
            return
        self.reference_denoiser = copy.deepcopy(self.unwrapped_denoiser()).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        """Inside, the model's outputs (`predict_noise`, `step_log_prob`) are the pretrained model's: with LoRA
        the adapters are disabled (peft's switch, through any accelerate wrapper), with all weights trained
        the frozen copy of `prepare_reference` answers. Guidance is applied as for the policy. Afterwards the
        policy is back, trainable. Wrap calls in `torch.no_grad()`: the reference is not trained."""
        if self.options.use_lora:
            from peft.tuners.tuners_utils import BaseTunerLayer

            layers = [module for module in self.unwrapped_denoiser().modules() if isinstance(module, BaseTunerLayer)]
            for layer in layers:
                layer.enable_adapters(False)
            try:
                yield
            finally:
                for layer in layers:
                    layer.enable_adapters(True)
            return
        frozen = getattr(self, "reference_denoiser", None)
        if frozen is None:
            raise RuntimeError(f"model '{self.name}' has no reference copy: call prepare_reference() first "
                               "(the trainer does when the algorithm sets needs_reference)")
        policy, self.denoiser = self.denoiser, frozen
        try:
            yield
        finally:
            self.denoiser = policy

    def unwrapped_denoiser(self):
        """The denoiser without the wrappers accelerate and `model.compile` add (DDP, compile), so parameter
        names carry no `module.` or `_orig_mod.` prefix."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.denoiser, keep_torch_compile=False)

    @contextlib.contextmanager
    def sampling(self):
        """Inside, denoiser forward passes run at the sampling phase's precision (`options.sample_precision`;
        "same": under `autocast`, unchanged)."""
        from ddpo.core.engine.performance import sampling_autocast

        training_autocast = self.autocast
        self.autocast = sampling_autocast(self, self.device, training_autocast)
        try:
            yield
        finally:
            self.autocast = training_autocast

    def configure_training(self) -> None:
        """Freeze the denoiser and add LoRA adapters, or unfreeze it all, by `options.use_lora`."""
        import torch

        denoiser = self.denoiser
        if not self.options.use_lora:
            denoiser.requires_grad_(True)
            return
        from peft import LoraConfig

        denoiser.requires_grad_(False)
        alpha = getattr(self.options, "lora_alpha", None) or self.options.lora_rank
        config = LoraConfig(r=self.options.lora_rank, lora_alpha=alpha,
                            init_lora_weights="gaussian", target_modules=list(self.lora_target_modules))
        try:
            if hasattr(denoiser, "add_adapter"):
                denoiser.add_adapter(config)
            else:
                from peft import inject_adapter_in_model

                inject_adapter_in_model(config, denoiser)
        except ValueError as error:
            raise UsageError(f"model '{self.name}' cannot take LoRA adapters ({error}); "
                             "set model.use_lora=false to fine-tune all weights") from None
        for parameter in denoiser.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.to(torch.float32)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.denoiser.parameters() if parameter.requires_grad]

    def trainable_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """(name, parameter) of the trainable weights, named without wrapper prefixes."""
        return [(name, parameter) for name, parameter in self.unwrapped_denoiser().named_parameters()
                if parameter.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights by parameter name, whole, detached, contiguous, on the CPU. With FSDP's shards or
        ZeRO-3's partitions every rank must call it (it gathers them), except inside `gathered_weights`."""
        if self._gathered is not None:
            return self._gathered
        from ddpo.core.engine.distributed import gathered_parameters, whole

        named = self.trainable_named_parameters()
        with gathered_parameters([parameter for _, parameter in named]):  # ZeRO-3's partitions, whole inside
            return {name: whole(parameter).to("cpu", copy=hasattr(parameter, "ds_tensor")).contiguous()
                    for name, parameter in named}

    @contextlib.contextmanager
    def gathered_weights(self):
        """Every rank enters: the trainable weights are gathered once, and inside, `trainable_state_dict` (so
        `save_weights` and `export_weights`) answers with them on any one rank alone."""
        self._gathered = self.trainable_state_dict()
        try:
            yield
        finally:
            self._gathered = None

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy trained weights in; the names must be exactly the trainable parameters."""
        import torch

        parameters = dict(self.trainable_named_parameters())
        if set(parameters) != set(state):
            missing, unexpected = sorted(set(parameters) - set(state)), sorted(set(state) - set(parameters))
            raise UsageError(f"checkpoint weights do not match model '{self.name}' with "
                             f"use_lora={self.options.use_lora}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        from ddpo.core.engine.distributed import shard_like

        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(shard_like(parameter, state[name]))

    def save_weights(self, directory: Path) -> None:
        """Write the trainable weights (safetensors) and the model's export format into `directory`."""
        from safetensors.torch import save_file

        save_file(self.trainable_state_dict(), str(Path(directory) / TRAINABLE_WEIGHTS))
        self.export_weights(Path(directory))

    def load_weights(self, directory: Path) -> None:
        """Load weights written by `save_weights`."""
        from safetensors.torch import load_file

        path = Path(directory) / TRAINABLE_WEIGHTS
        if not path.is_file():
            raise UsageError(f"no trained weights at {path}; give a checkpoint directory "
                             "like RUN/checkpoints/epoch_0003")
        self.load_trainable_state_dict(load_file(str(path)))


def classifier_free_guidance(output: torch.Tensor, guidance_scale: float,
                             detach_unconditional: bool) -> torch.Tensor:
    """u + w (c − u) from a batched output (2B, ...) whose first half is unconditional (u) and second conditional
    (c). With `detach_unconditional` (Flow-GRPO, train_sd3.py:190) u passes no gradient, so the guided output's
    gradient is w ∇c instead of w ∇c − (w − 1) ∇u; the value is the same."""
    unconditional, conditional = output.chunk(2)
    if detach_unconditional:
        unconditional = unconditional.detach()
    return unconditional + guidance_scale * (conditional - unconditional)


def load_pretrained(pipeline_class: str, pretrained: str, **kwargs):
    """`diffusers.<pipeline_class>.from_pretrained(pretrained, **kwargs)`, quietly, with a usage error when
    the weights cannot be found. The imports and the loading run with the garbage collector paused
    (`ddpo.core.engine.startup`)."""
    with gc_paused():
        return _load_pretrained(pipeline_class, pretrained, **kwargs)


def _load_pretrained(pipeline_class: str, pretrained: str, **kwargs):
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # before diffusers imports the pipeline's processors
    transformers_logging.disable_progress_bar()
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    if not pretrained:
        raise UsageError("model.pretrained is empty; give a hub id or a local diffusers directory")
    try:
        return getattr(diffusers, pipeline_class).from_pretrained(pretrained, **kwargs)
    except Exception as error:  # missing files, no network, not a pipeline directory: all user-fixable
        reason = " ".join(str(error).split())[:300]
        where = "the local directory" if Path(pretrained).exists() else "the hub id (no network and no cached copy?)"
        raise UsageError(f"cannot load model.pretrained='{pretrained}' as a {pipeline_class}: {reason}. "
                         f"Check {where}; give a hub id or a local directory saved with save_pretrained") from error
