"""MixGRPO: GRPO on a sliding window of SDE steps, ODE steps elsewhere (Li et al. 2025, arXiv 2507.21802).

Sampling mixes the two: inside a window of `size` consecutive denoising steps the policy takes the stochastic
step (Flow-GRPO's SDE at noise level η on flow models; DDIM with eta on DDIM models), outside it the
deterministic one (the ODE's Euler step x + v dt; DDIM with eta 0). Only the window's steps have log-probabilities
and only they are trained, so a training pass costs `size` forward passes per sample instead of one per step. The
window slides: it starts at the noisiest step and moves `stride` steps every `shift_every` training iterations,
back to the start when it reaches the end (`sample.sde_window`, placement sliding). The loss is GRPO's, over
the window's steps W:

    A_i = (r_i − mean_group(r)) / (std_group(r) + ε),   clipped to ±5
    ρ_t = exp(log p_θ(x_{t−1} | x_t, c) − log p_old(x_{t−1} | x_t, c))
    L   = mean over i and t ∈ W of max(−A_i ρ_t, −A_i clip(ρ_t, 1 − ε_clip, 1 + ε_clip)),   ε_clip = 1e-4

Facts from the official code, Tencent-Hunyuan/MixGRPO@e5cdd6a:
- The window: fastvideo/utils/grpo_states.py:141-148 (steps cur .. cur + group_size − 1, cut at max_timesteps),
  :85-99 (progressive: after iters_per_group iterations cur moves by prog_overlap_step), :136-139 (roll_back to
  the first step); train_grpo_flux.py:915-928 (max_timesteps = sampling_steps − 2, starting at 0) and :945-947
  (one move per training iteration, each one sampling and one update, ddpo's epoch). Recipe,
  scripts/finetune/finetune_flux_grpo_MixGRPO.sh:54-60: 25 sampling steps, η 0.7, window (`group_size`) 4,
  iters_per_group 25, prog_overlap_step 1, KL coefficient 0; :135 lr 1e-5, :150 12 images per prompt, :151 shift
  3, :155 the same initial noise per prompt, :156-157 clip 1e-4 and advantages clipped to ±5, :196 Flow-GRPO's SDE.
- Outside the window the step is deterministic, x + dt v: train_grpo_flux.py:236-241 (`determistic` everywhere but
  the window), utils/sampling_utils.py:83-93 and :198-199. Inside it, Flow-GRPO's SDE step (:186-195).
- The loss, train_grpo_flux.py:543-584: for each sample, for each window step, PPO's clipped surrogate with the
  clipped advantage; KL coefficient 0. Advantages (:459-479): group mean and unbiased std + 1e-8, where grpo uses
  the population std + 1e-4 (the same ordering and nearly the same scale).

So the loss is exactly grpo's; what MixGRPO adds is the sampler's window, a run setting (`sample.sde_window`) that
any algorithm can use. `mixgrpo` is grpo with MixGRPO's window and recipe as its run defaults, and runs are
labelled mixgrpo (its tags are grpo's, `grpo/...`): it refuses to run without a window, which would make it grpo.

Differences, by choice: ddpo's windows never shrink. MixGRPO's start may reach max_timesteps = sampling_steps − 2,
and its window is cut there (a start of 20 trains 20-22, a start of 23 trains nothing for 25 iterations);
ddpo moves the window back to `start` when a whole one no longer fits below `end` (default num_steps − 1, the last
step never stochastic as there). MixGRPO-Flash (finetune_flux_grpo_MixGRPO_Flash.sh:57,75-79) replaces the ODE
steps after the window by fewer DPM-Solver++ (2M, midpoint) steps on a compressed schedule (sampling_utils.py:
29-60: 40% of them); ddpo keeps the schedule and the first-order step, so its trajectories have one length.
MixGRPO trains FLUX; ddpo runs it on every model whose eta turns the noise off (DDIM, the flow SDEs; not DDPM).
"""

from __future__ import annotations

import pydantic

import ddpo
from ddpo.plugins.algorithms.grpo import GroupRelativePolicyOptimization


class MixGRPO(GroupRelativePolicyOptimization):
    """MixGRPO: GRPO trained on a sliding window of SDE steps, deterministic (ODE) steps elsewhere."""

    name = "mixgrpo"
    needs_sde_window = True
    # MixGRPO's recipe (finetune_flux_grpo_MixGRPO.sh, see the module docstring); on FLUX its window slides over
    # steps 0-23 of 25, one step every 25 iterations.
    run_defaults = {
        "sample": {"num_steps": 25, "eta": 0.7,
                   "sde_window": {"size": 4, "placement": "sliding", "stride": 1, "shift_every": 25}},
        "train": {"learning_rate": 1e-5},
    }
    # On digits: grpo's recipe (groups of 8 from one noise, clip 0.2, KL 0.1 to the base model) with a window of 10
    # of the 20 DDIM steps moving 2 steps every 2 epochs (0-9, 2-11, 4-13, 6-15 in 8 epochs): half the training
    # passes. MixGRPO's own window of 4 did not learn in 8 epochs here (rises -0.07 to 0.09 on targets 3/8 x seeds
    # 0/1), nor with lr 6e-4 and independent noises (the digits broke). tests/test_mixgrpo.py gives the figures.
    model_run_defaults = {
        "digits": {
            "algorithm": {"name": "mixgrpo", "group_size": 8, "clip_range": 0.2, "kl_beta": 0.1},
            "sample": {"batch_size": 32, "batches_per_epoch": 2, "num_steps": 20, "eta": 1.0,
                       "sde_window": {"size": 10, "placement": "sliding", "stride": 2, "shift_every": 2}},
            "train": {"batch_size": 16, "grad_accum": 1, "learning_rate": 2e-4, "steps_per_pass": 10},
        },
    }

    class Options(GroupRelativePolicyOptimization.Options):
        group_size: int = pydantic.Field(12, ge=2)
        """Images per prompt (MixGRPO: 12, finetune_flux_grpo_MixGRPO.sh:150)."""


@ddpo.hookimpl
def register_algorithms(register):
    register(MixGRPO)
