"""DiffusionNFT: online diffusion reinforcement on the forward process (Zheng et al. 2025, arXiv 2509.16117).

Likelihood-free and solver-agnostic: the sampling policy v_old draws clean images with any sampler (an ODE is fine:
no log-probabilities are used), the reward turns into an optimality probability r in [0, 1], and the policy is
trained with the model's own denoising loss on the images re-noised, towards an implicit positive policy weighted
by r and an implicit negative one weighted by 1 − r. No guidance in training (CFG-free).

With A the group-relative advantage (GRPO's, the group the images of one prompt in the epoch, divided by the
std of all the epoch's rewards: NVlabs/DiffusionNFT@24af555 flow_grpo/stat_tracking.py:26-31, config/base.py:57),
clipped to ±c (c = `advantage.clip_max`, 5: config/base.py:84):

    r    = clip(0.5 + 0.5 A / c, 0, 1)                                     (scripts/train_nft_sd3.py:910-929)
    x_t  = forward process of the sample x_0 at t with fresh noise ε      (train_nft_sd3.py:862-870; flow:
                                                                            (1 − t) x_0 + t ε)
    v⁺   = β v_θ + (1 − β) v_old ,   v⁻ = (1 + β) v_old − β v_θ            (v_old without gradient; :934-937)
    e(v) = x̂_0(v) − x_0,  x̂_0 the clean state v implies at x_t            (flow: x_t − t v; :940, :948)
    l(v) = mean(e(v)²) / sg(max(mean |e(v)|, 1e-5))                        (adaptive weighting, :939-957)
    L    = c / β · mean over samples (r l(v⁺) + (1 − r) l(v⁻))  +  β_KL mean((v_θ − v_ref)²)   (:959-970)

v stands for the model's output in its own parametrisation (velocity on `sd3`, ε on DDPM/DDIM models); the error is
measured on x̂_0 whatever it is. With `adaptive_weighting=false` l(v) is the model's own loss instead,
mean((v − target)²) (on flow models the plain velocity MSE, uniform in t). v_ref is the pretrained model (LoRA off) and
β_KL = `kl_beta` (train.beta = 1e-4, config/base.py:89, config/nft.py:24). At v_θ = v_old the gradient is
c (2r − 1) ∇l: images above their group's mean are pulled towards, those below pushed away, and a sample with
r = 1/2 teaches nothing.

Times: each image is re-noised at K = int(T · train.timestep_fraction) of its sampling schedule's T times (each
image its own random K, a random order; config.sample.num_steps 10 and timestep_fraction 0.99 give 9:
train_nft_sd3.py:569, 806-816), each with fresh noise and its own backward pass; an optimizer step takes
train.grad_accum minibatches x K (:801, :983).

The old policy: v_old is a second copy of the trained weights that both samples the epoch's images
(train_nft_sd3.py:640-659) and answers v_old in training; it starts as the policy (:576-580) and after each epoch's
update moves towards it, θ_old ← d θ_old + (1 − d) θ with d = min(max(0, n − delay) · rate, max) at the run's
optimizer step count n (:1034-1039, :169-189): `old_decay_rate` 0.001 and `old_decay_max` 0.5 (decay_type 1,
config/nft.py:60; OCR uses type 2: delay 75, rate 0.0075, max 0.999, nft.py:78). So v_old is always the policy
that sampled the epoch's images, and with d = 0 (`old_decay_max=0`) it is the trained weights of the epoch's start.
ddpo keeps the official soft update as the default rather than that on-policy special case: it is what the
reported results ran with, and under its schedule (d = 0.001 n) the two differ little for the first hundred
optimizer steps anyway. The old weights are swapped into the model for the sampling pass and for each v_old
pass (a copy of the trained weights in memory, like the official second LoRA adapter), and checkpointed.

Defaults (config/nft.py, config/base.py): β 1 (nft.py:61; 0.1 for OCR and the multi-reward run, :77, :137),
24 images per prompt and 48 prompts per epoch (nft.py:28-29), 10 deterministic sampling steps with DPM-Solver 2
(nft.py:20, 65-66; here any sampler, e.g. `sample.eta=0`), guidance 1 (nft.py:64), lr 3e-4 (base.py:66), LoRA
r32/α64 (train_nft_sd3.py:430-432), an EMA of the weights (decay 0.9 every step) for evaluation (base.py:92,
train_nft_sd3.py:567): `--preset diffusion-nft-sd35`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import pydantic

import ddpo
from ddpo.core.configuration.errors import UsageError

if TYPE_CHECKING:
    import torch

ADAPTIVE_WEIGHT_FLOOR = 1e-5
"""The smallest divisor of the adaptive weighting (train_nft_sd3.py:945)."""


def optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """The optimality probability r (B,) = clip(0.5 + 0.5 A / clip_max, 0, 1) of advantages A (B,)."""
    return (0.5 + 0.5 * advantages.clamp(-clip_max, clip_max) / clip_max).clamp(0, 1)


def regression_loss(error: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """Per-sample loss (B,) of an error (B, ...): mean(error²), with `adaptive` divided by the detached
    max(mean |error|, 1e-5) (DiffusionNFT's adaptive weighting)."""
    import torch

    dims = tuple(range(1, error.ndim))
    loss = (error**2).mean(dim=dims)
    if not adaptive:
        return loss
    with torch.no_grad():
        weight = error.abs().mean(dim=dims).clamp(min=ADAPTIVE_WEIGHT_FLOOR)
    return loss / weight


def negative_aware_loss(policy_output: torch.Tensor, old_output: torch.Tensor, optimality: torch.Tensor,
                        beta: float, loss_of: Callable[[torch.Tensor], torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffusionNFT's per-sample loss (r l(v⁺) + (1 − r) l(v⁻)) / β with v⁺ = β v_θ + (1 − β) v_old and
    v⁻ = (1 + β) v_old − β v_θ, the model outputs (B, C, H, W) v_θ (`policy_output`) and v_old (`old_output`,
    detached here), r (B,) and `loss_of` mapping an output to its per-sample loss (B,).

    Returns `(loss, positive, negative)`, each (B,): the weighted loss and l(v⁺), l(v⁻)."""
    old_output = old_output.detach()
    positive = loss_of(beta * policy_output + (1 - beta) * old_output)
    negative = loss_of((1 + beta) * old_output - beta * policy_output)
    return (optimality * positive + (1 - optimality) * negative) / beta, positive, negative


class OldPolicy:
    """DiffusionNFT's sampling ("old") policy: a copy of the trained weights (name -> tensor, like the trained
    parameters, sharded as they are) that samples each epoch and answers v_old in training, soft-updated towards
    the trained weights after each update."""

    def __init__(self, parameters: dict[str, torch.nn.Parameter]):
        self.parameters = parameters
        self.weights = {name: parameter.detach().clone() for name, parameter in parameters.items()}

    def applied(self):
        """Inside, the model holds the old weights; afterwards, exactly its trained ones."""
        from ddpo.core.engine.ema import weights_applied

        return weights_applied(self.parameters, self.weights)

    def soft_update(self, decay: float) -> None:
        """θ_old ← decay θ_old + (1 − decay) θ."""
        import torch

        with torch.no_grad():
            for name, parameter in self.parameters.items():
                self.weights[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)

    def state(self) -> dict[str, torch.Tensor]:
        """The old weights whole, on the CPU (every rank calls this under FSDP)."""
        from ddpo.core.engine.distributed import whole

        return {name: whole(weight).to("cpu").contiguous() for name, weight in self.weights.items()}

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        from ddpo.core.engine.distributed import shard_like

        for name, parameter in self.parameters.items():
            self.weights[name] = shard_like(parameter, weights[name]).to(parameter.device, parameter.dtype).clone()



class DiffusionNFT(ddpo.Algorithm):
    """DiffusionNFT: negative-aware fine-tuning on the forward process, likelihood- and CFG-free (Zheng et al. 2025)."""

    name = "diffusion-nft"
    needs_log_probs = False
    # The paper's recipe on any model: deterministic sampling (official: 10 DPM-Solver-2 steps on SD3.5), no
    # guidance, LoRA's lr 3e-4, 9 of 10 steps re-noised. `--preset diffusion-nft-sd35` has the whole recipe.
    run_defaults = {
        "sample": {"eta": 0.0, "guidance_scale": 1.0},
        "train": {"learning_rate": 3e-4, "timestep_fraction": 0.99},
    }
    # On digits (an ε-prediction DDPM, 20 DDIM steps): 128 images per epoch from the stochastic sampler (eta 1), each
    # re-noised at 5 of its 20 times (more images and fewer times than the demo's 64 x 20: a rare target digit needs
    # the images), 4 optimizer steps per epoch, all weights at lr 5e-4, no KL (no reference pass). In 8
    # epochs targets 7 and 8 x seeds 0, 1 rose 0.48-0.83 and target 3 seed 0 0.70, legibility >= 0.93; target 3
    # seed 1 did not learn (tests/test_nft.py). Deterministic sampling (eta 0) learned on one pair of four: the first
    # updates moved the class mix at random. `adaptive_weighting=false` (the ε-MSE) learned less (target 3, seed 0,
    # 6 epochs, eta 0: 0.06 -> 0.13 at lr 3e-4; at 1e-3 the reward fell to 0).
    model_run_defaults = {
        "digits": {
            "algorithm": {"name": "diffusion-nft", "kl_beta": 0.0},
            "sample": {"batch_size": 32, "batches_per_epoch": 4, "eta": 1.0},
            "train": {"batch_size": 32, "grad_accum": 1, "learning_rate": 5e-4, "timestep_fraction": 0.25},
        },
    }

    class Options(ddpo.Options):
        beta: float = pydantic.Field(1.0, gt=0)
        """β of the implicit policies v± (config/nft.py:61: 1; 0.1 for OCR and multi-reward)."""
        group_size: int = pydantic.Field(8, ge=1)
        """Images per prompt, each from its own noise (official: 24; 8 suits CPU-sized runs)."""
        group_by: Literal["group", "prompt"] = "prompt"
        """The baseline of an image: the epoch's images of its prompt (official: prompt, stat_tracking.py), or the
        images sampled together with it."""
        global_std: bool = True
        """Divide the advantages by the std of the whole epoch's rewards (official: config/base.py:57), else by
        their group's."""
        adaptive_weighting: bool = True
        """The error on x̂_0 over its detached mean magnitude (official); false: the model's own loss in its
        parametrisation (velocity or ε), uniform over times."""
        kl_beta: float = pydantic.Field(1e-4, ge=0)
        """Weight of mean((v_θ − v_ref)²) to the pretrained model (official train.beta: 1e-4); 0 skips its pass."""
        old_decay_rate: float = pydantic.Field(0.001, ge=0)
        """The old policy's soft-update decay grows by this per optimizer step (official decay_type 1: 0.001)."""
        old_decay_max: float = pydantic.Field(0.5, ge=0, lt=1)
        """... up to this (decay_type 1: 0.5; 0 keeps v_old the policy of the epoch's start)."""
        old_decay_delay: int = pydantic.Field(0, ge=0)
        """... after this many optimizer steps at decay 0 (decay_type 1: 0; type 2, OCR: 75)."""

    def __init__(self, options=None):
        super().__init__(options)
        self.old: OldPolicy | None = None
        self.optimizer_steps = 0
        """Optimizer steps of the run so far (the official global_step the decay grows with)."""
        self.zero_std_groups = 0

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_beta > 0

    def group_size(self) -> int:
        return self.options.group_size

    def shares_group_noise(self) -> bool:
        """Never: with a deterministic sampler a group from one noise would be one image repeated."""
        return False

    def setup(self, run):
        from ddpo.core.engine.distributed import deepspeed_engine

        if deepspeed_engine(run.accelerator) is not None:
            raise UsageError("diffusion-nft keeps its old policy as a second copy of the trained weights, swapped in "
                             "whole, which ZeRO partitions; shard with --distributed fsdp")
        self.old = OldPolicy(dict(run.model.trainable_named_parameters()))

    def sampling_weights(self, run):
        return self.old.applied()

    def old_decay(self) -> float:
        """d = min(max(0, n − delay) · rate, max) at the run's optimizer step count n."""
        options = self.options
        return min(max(0, self.optimizer_steps - options.old_decay_delay) * options.old_decay_rate,
                   options.old_decay_max)

    def compute_advantages(self, run, trajectory):
        from ddpo.core.math.advantages import epoch_group_advantages

        advantages, self.zero_std_groups = epoch_group_advantages(run, trajectory, self.options.group_by,
                                                                  self.options.global_std)
        return advantages

    def pass_loss(self, run, original: torch.Tensor, prompt_embeds, timesteps: torch.Tensor, r: torch.Tensor,
                  generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one pass: clean samples `original` (B, C, H, W) re-noised at `timesteps` (B,) with fresh
        noise, their optimality `r` (B,). Returns the scalar to back-propagate and its tags."""
        import torch

        model, options = run.model, self.options
        original = original.to(torch.float32)
        noise = torch.randn(original.shape, generator=generator, dtype=torch.float32).to(original.device)
        noisy, timesteps, target = model.sampler.noised(original, noise, timesteps)
        with torch.no_grad(), self.old.applied():
            old_output = model.predict_noise(noisy, timesteps, prompt_embeds, guidance_scale=1.0)
        output = model.predict_noise(noisy, timesteps, prompt_embeds, guidance_scale=1.0)
        if options.adaptive_weighting:
            def loss_of(prediction):
                error = model.sampler.predicted_original(prediction, noisy, timesteps) - original
                return regression_loss(error, adaptive=True)
        else:
            def loss_of(prediction):
                return regression_loss(prediction - target, adaptive=False)
        losses, positive, negative = negative_aware_loss(output, old_output, r, options.beta, loss_of)
        policy_loss = run.config.advantage.clip_max * losses.mean()
        tags = {"loss/policy": policy_loss.item(), "diffusion-nft/positive_loss": positive.mean().item(),
                "diffusion-nft/negative_loss": negative.mean().item(),
                "diffusion-nft/old_deviation": ((output - old_output) ** 2).mean().item()}
        total = policy_loss
        if options.kl_beta > 0:
            with torch.no_grad(), model.reference():
                reference_output = model.predict_noise(noisy, timesteps, prompt_embeds, guidance_scale=1.0)
            kl = ((output - reference_output) ** 2).flatten(1).mean(dim=1).mean()
            total = policy_loss + options.kl_beta * kl
            tags.update({"loss/kl": kl.item(), "policy/kl_to_reference": kl.item()})
        tags["loss/total"] = total.item()
        return total, tags

    def update(self, run, trajectory):
        import torch

        from ddpo.core.math.forward import renoising_steps
        from ddpo.core.math.policy import EpochStatistics
        from ddpo.core.plugin_api.schema import prompt_embeds_at

        config = run.config.train
        device = trajectory.latents.device
        originals = trajectory.latents[:, -1]
        r = optimality(trajectory.advantages, run.config.advantage.clip_max)
        samples, batch_size = trajectory.batch_size, config.batch_size
        times = max(1, int(trajectory.num_steps * config.timestep_fraction))
        per_pass = min(config.steps_per_pass, times)
        accumulator = run.accumulator(config.grad_accum * times)
        statistics = EpochStatistics()
        total = config.inner_epochs * (samples // batch_size) * times
        with run.progress(total, f"epoch {run.epoch}/{run.config.epochs} training") as bar:
            for inner_epoch in range(config.inner_epochs):
                generator = run.generator(f"train-{inner_epoch}")
                order = torch.randperm(samples, generator=generator)
                steps = renoising_steps(samples, trajectory.num_steps, config.timestep_fraction, generator)
                for start in range(0, samples // batch_size * batch_size, batch_size):
                    rows = order[start:start + batch_size]
                    for first in range(0, times, per_pass):
                        positions = min(per_pass, times - first)
                        # `positions` re-noising times of the minibatch stacked in one pass, position-major
                        stacked = rows.repeat(positions).to(device)
                        chosen = steps[start:start + batch_size, first:first + positions].T.flatten().to(device)
                        with accumulator.micro_step(positions):
                            loss, tags = self.pass_loss(run, originals[stacked],
                                                        prompt_embeds_at(trajectory.prompt_embeds, stacked),
                                                        trajectory.timesteps[stacked, chosen], r[stacked], generator)
                            accumulator.backward(loss)
                        statistics.add(tags, positions)
                        bar.update(positions)
        accumulator.check_finished()
        self.optimizer_steps += accumulator.optimizer_steps
        decay = self.old_decay()
        self.old.soft_update(decay)
        summary = statistics.summary(accumulator)
        summary.update({"diffusion-nft/old_decay": decay, "diffusion-nft/zero_std_groups": float(self.zero_std_groups),
                        "diffusion-nft/optimality_mean": float(r.mean())})
        return summary

    def state_dict(self):
        return {"old_weights": self.old.state(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state):
        self.old.load(state["old_weights"])
        self.optimizer_steps = state["optimizer_steps"]


@ddpo.hookimpl
def register_algorithms(register):
    register(DiffusionNFT)
