"""GRPO-Guard: GRPO with regulated clipping, ratio normalisation and gradient reweighting (Wang et al. 2025,
arXiv 2510.22319).

The paper's observation: on a Gaussian step with std s (the step's whole std, η sqrt(σ/(1−σ)) sqrt(|dt|) on
Flow-GRPO's SDE) and the outcome x' = μ_old + s ε drawn by the sampling policy, the log-ratio of the policy being
trained is

    log ρ = mean((x' − μ_old)² − (x' − μ_θ)²) / (2 s²) = mean(Δμ ε) / s − mean(Δμ²) / (2 s²),   Δμ = μ_θ − μ_old

(means over the elements, as every log-prob here). The second term is never positive, so the ratio's mean sits
below 1, and by more at the low-noise steps where s is small; its spread mean(Δμ ε)/s also changes with s. PPO's
clip then rarely stops a positive-advantage sample (ρ seldom exceeds 1 + ε) and the steps differ in how hard they
are clipped: the "implicit over-optimisation" of the title (proxy reward up, image quality and alignment down).

RatioNorm (the paper's Eq. 8) removes the bias and the scale:

    log ρ̂ = s (log ρ + mean(Δμ²) / (2 s²)) = mean(Δμ ε)      mean 0 over ε, a spread that does not grow as s → 0

and the gradient reweighting (Eq. 12) divides each step's loss by its |dt|, since the gradient of mean(Δμ ε)
through μ_θ = x + (1 + η²/2) v_θ dt is proportional to dt:

    L = mean over samples i and trained steps t of (1/|dt_t|) max(−A_i ρ̂_t, −A_i clip(ρ̂_t, 1 − ε, 1 + ε)) + β KL

with grpo's advantages A (group-relative, clipped to ±5) and optional KL to the pretrained model (`kl_beta`).
The bias term keeps its gradient (it pulls μ_θ back towards μ_old) and μ_old is the sampling policy's step mean,
kept from the rollout (`Algorithm.needs_step_means`), so no pass of the old policy is needed.

Sources. The official code is not released (the paper's project page, jingw193.github.io/GRPO-Guard, has none).
The formulas are the paper's as three independent implementations write them, which agree: X-GenGroup/
Flow-Factory@a0b2bc5 src/flow_factory/trainers/grpo.py:501-504 (`GRPOGuardTrainer`: ratio = exp((log p −
log p_old) s + mse / (2 s)), s = sqrt(−dt) std_dev_t, mse the mean squared difference of the step means; it leaves
the 1/|dt| weight out), verl-omni's `GRPOGuardLoss` (docs algo/grpo_guard.md: the same ratio and the 1/(sqrt(−dt))²
weight on the loss) and TeleAI's TeleBoost recipe (algorithms/grpo_guard.py: "RatioNorm (Eq. 8)" and
"grad-reweight (Eq. 12)", δ = 1/Δt for Flow-GRPO's SDE). The paper's clip range and learning rates are not
public; the defaults here are grpo's (clip 1e-4, as Flow-GRPO), over which GRPO-Guard is a drop-in change of the
loss (the paper runs it on Flow-GRPO's and DanceGRPO's recipes).

On DDIM and DDPM models (digits, SD 1.x) the step has no dt: RatioNorm applies with the step's own std and the
reweighting is 1. The tags are grpo's (`policy/ratio_mean` and `policy/clipfrac` of the plain ratio ρ) and
`grpo_guard/ratio_mean`, `grpo_guard/clipfrac` of the normalised ratio ρ̂ that the loss clips, and
`grpo_guard/ratio_bias`, the mean of mean(Δμ²) / (2 s²) that RatioNorm adds back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ddpo
from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization

if TYPE_CHECKING:
    import torch


def guarded_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                      old_mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, ratio_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO-Guard's loss mean(weight · max(−A ρ̂, −A clip(ρ̂, 1 ± ε))) over (B,) transitions, with the normalised
    ratio ρ̂ = exp(s (log ρ + mean(Δμ²) / (2 s²))) (or plain ρ without `ratio_norm`). `log_prob`, `old_log_prob`,
    `weight`, `advantages` (B,); `mean`, `old_mean` (B, C, H, W); `std` (B|1, 1, 1, 1) the step's whole std.
    Returns `(loss, ratio, bias)`, ratio ρ̂ (B,) and bias mean(Δμ²) / (2 s²) (B,)."""
    import torch

    step_std = std.reshape(-1).expand(log_prob.shape[0])
    bias = (mean - old_mean).pow(2).flatten(1).mean(dim=1) / (2 * step_std**2)
    log_ratio = log_prob - old_log_prob
    if ratio_norm:
        log_ratio = step_std * (log_ratio + bias)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    surrogate = torch.maximum(-advantages * ratio, -advantages * clipped)
    return (weight * surrogate).mean(), ratio, bias


class GRPOGuard(GroupRelativePolicyOptimization):
    """GRPO-Guard: GRPO with the ratio normalised per step (RatioNorm) and each step's loss weighted by 1/|dt|."""

    name = "grpo-guard"
    needs_step_means = True
    # On digits: grpo's recipe (groups of 8 from one noise, clip 0.2, KL 0.1 to the base model). See
    # tests/test_grpo_guard.py for what it learns.
    model_run_defaults = {
        "digits": {
            "algorithm": {"name": "grpo-guard", "clip_range": 0.2, "kl_beta": 0.1},
            "sample": {"batch_size": 32, "batches_per_epoch": 2},
            "train": {"batch_size": 16, "grad_accum": 1, "learning_rate": 2e-4},
        },
    }

    class Options(GroupRelativePolicyOptimization.Options):
        ratio_norm: bool = True
        """RatioNorm: the log-ratio with its bias mean(Δμ²)/(2s²) added back, times the step's std s (paper Eq. 8)."""
        grad_reweight: bool = True
        """Weight each step's loss by 1/|dt| (paper Eq. 12); 1 on DDIM and DDPM steps, which have no dt."""

    def on_policy_samples(self, config):
        """None: the normalised ratio's gradient is not the sampling pass's -A grad log p."""
        return 0

    def policy_loss(self, run, transitions, step):
        """`guarded_surrogate` on the pass's transitions, with the sampling policy's means kept by the rollout;
        logs the normalised ratio's mean and clip fraction and the bias RatioNorm removed."""
        import torch

        from ddpo.core.engine.rollout import STEP_MEANS

        options = self.options
        rows = torch.arange(len(transitions.steps), device=transitions.steps.device)
        old_mean = transitions.extras[STEP_MEANS][rows, transitions.steps].to(step.mean.device)
        weight = torch.ones_like(step.log_prob)
        if options.grad_reweight:
            duration = run.model.sampler.step_duration(transitions.timesteps, transitions.prev_timesteps)
            weight = 1 / duration.reshape(-1).to(step.log_prob.device)
        loss, ratio, bias = guarded_surrogate(step.log_prob, transitions.log_probs, step.mean, old_mean, step.std,
                                              weight, transitions.advantages, options.clip_range, options.ratio_norm)
        ratio = ratio.detach()
        return loss, {"grpo_guard/ratio_mean": ratio.mean(), "grpo_guard/ratio_bias": bias.detach().mean(),
                      "grpo_guard/clipfrac": ((ratio - 1).abs() > options.clip_range).float().mean()}


@ddpo.hookimpl
def register_algorithms(register):
    register(GRPOGuard)
