"""DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models (Fan et al., NeurIPS 2023,
arXiv 2305.16381).

Policy gradient over denoising steps with a KL regulariser that keeps the policy near the pretrained model:

    min_theta  E[ -alpha r(x_0, c) ] + beta sum_t E[ KL( p_theta(x_{t-1} | x_t, c) || p_pre(x_{t-1} | x_t, c) ) ]

As the official code implements it, per transition (x_t -> x_{t-1}, step index k, prompt c, reward r):

    rho = clamp(exp(log p_theta - log p_old), 1 - ratio_clip, 1 + ratio_clip)     ratio_clip = 1e-4
    A   = r - V(x_t, c, k)                                                        learned value baseline
    L   = mean(-alpha A rho) + beta mean(KL)

The ratio is hard-clamped, not PPO's min/max: once rho leaves the band its gradient is zero whatever the sign
of A. The reference p_pre is the pretrained model (LoRA adapters off, or a frozen copy when all weights are
trained), evaluated on the same transitions. Two KL estimates:

- `eps-mse` (the official code, default): the element mean of (eps_theta - eps_pre)^2, the two model outputs
  after classifier-free guidance, with no sigma_t weighting.
- `gaussian`: the closed form for two Gaussians with the same sigma_t, ||mu_theta - mu_pre||^2 / (2 sigma_t^2),
  as an element mean (the scale of the per-element log-probabilities, DESIGN.md §7).

The value network (`ddpo.core.critic.StepValueNetwork`, the official `ValueMulti`: flattened x_t and the prompt
embedding, step-gated layers of 256 units) is fitted by MSE to the raw final reward before each policy update,
with AdamW at lr 1e-4. Officially that is one optimizer step per round of sampling over 5 accumulated
micro-batches of 256 transitions drawn at random from a replay buffer of the last 1000 transitions; here the
micro-batches are drawn, with replacement, from this epoch's trajectories (there is no buffer across epochs).
With `value_baseline=false`, A is the trainer's advantage (DDPO's per-prompt normalised reward, clipped).
With the baseline, A is in the reward's own units (the official code neither normalises nor clips it); it is
still clipped to +-advantage.clip_max, as every advantage here is, which only bites for rewards whose scale
exceeds it (JPEG sizes in kB) while V catches up.

alpha and beta: the official README gives alpha 10, beta 0.01 for single-prompt runs and alpha 1000, beta 0.1
for many prompts (the script's argparse defaults are 100 and 0.01); all with ImageReward, whose scores are of
order 1. The defaults are the single-prompt pair: it is the paper's main setting, its 10 images per round are
the sampling defaults below, and its KL weighs ten times more against the reward (alpha/beta = 1000, not 10^4),
the cautious side for a reward of unknown scale. Only alpha/beta and the clamp shape a step: Adam undoes a
common scale. The rest of the official recipe (SD 1.5, LoRA rank 4): lr 1e-5, gradient norm clipped to 0.1,
DDIM 50 steps, eta 1, guidance 7.5, 10 images per round, 5 policy steps per round of 2 x 12 accumulated random
transitions (120 transitions). Mapped onto epochs: 10 samples, 12 random steps of each (timestep_fraction 0.25),
one optimizer step per 2 samples: 5 steps of 24 transitions.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import ddpo


def eps_mse_kl(model_output, reference_output):
    """DPOK's KL estimate (B,): the element mean of (eps_theta - eps_pre)^2 over each sample's model outputs
    (B, C, H, W) after guidance."""
    return ((model_output - reference_output) ** 2).flatten(1).mean(dim=1)


def dpok_loss(log_prob, old_log_prob, advantages, kl, reward_weight: float, kl_weight: float, ratio_clip: float):
    """DPOK's loss over (B,) transitions: mean(-alpha A clamp(rho, 1 +- ratio_clip)) + beta mean(KL).
    Returns `(total, policy_term, kl_term)`."""
    ratio = (log_prob - old_log_prob).exp().clamp(1 - ratio_clip, 1 + ratio_clip)
    policy_term = (-reward_weight * advantages * ratio).mean()
    kl_term = kl_weight * kl.mean()
    return policy_term + kl_term, policy_term, kl_term


class DPOK(ddpo.Algorithm):
    """DPOK: policy gradient with a KL penalty to the pretrained model and a value baseline (Fan et al. 2023)."""

    name = "dpok"
    needs_reference = True
    run_defaults = {
        "sample": {"num_steps": 50, "eta": 1.0, "guidance_scale": 7.5, "batch_size": 10, "batches_per_epoch": 1},
        "train": {"learning_rate": 1e-5, "max_grad_norm": 0.1, "batch_size": 2, "grad_accum": 1,
                  "timestep_fraction": 0.25},
    }
    # On the digits demo (unconditional, rewards in [0, 1], all weights trained): the demo's sampling, a learning
    # rate that moves the small network, and one optimizer step per epoch, so that every transition is trained
    # inside the clamp band (with two steps the second half of the samples fell outside it and gave no reward
    # gradient; one of two seeds fell towards 0 within 4 epochs). DDPO's normalised advantages instead of the
    # value baseline (fitted from 64 samples a round, r - V steered runs into collapse), and beta = alpha / 100
    # (at beta = alpha the KL gradient dominated and the reward stayed flat; at alpha / 10 it rose slowly).
    # beta = alpha / 20 since issue 22: at alpha / 100 the samples of target 7 stopped reading as digits
    # (legibility 0.18); at alpha / 20, 8 epochs on targets 3, 7, 8 x seeds 0, 1 rose by 0.50 0.61 0.19 0.32 0.43
    # 0.68 (mean of the last two epochs minus the first) with legibility >= 0.78; at alpha / 10 by 0.29 0.49 0.06
    # 0.16 0.26 0.39 (benchmarks/bench_learning_tests.py, one thread, AMD EPYC).
    model_run_defaults = {
        "digits": {
            "sample": {"batch_size": 32, "batches_per_epoch": 2, "num_steps": 20, "guidance_scale": 1.0},
            "train": {"learning_rate": 1e-3, "max_grad_norm": 1.0, "batch_size": 32, "grad_accum": 2,
                      "timestep_fraction": 1.0},
            "algorithm": {"name": "dpok", "reward_weight": 1.0, "kl_weight": 0.05, "value_baseline": False},
        },
    }

    class Options(ddpo.Options):
        reward_weight: float = pydantic.Field(10.0, ge=0)
        """alpha, the weight of the reward term (official README: 10 for one prompt, 1000 for many)."""
        kl_weight: float = pydantic.Field(0.01, ge=0)
        """beta, the weight of the KL to the pretrained model (official README: 0.01 for one prompt, 0.1 for many)."""
        kl_mode: Literal["eps-mse", "gaussian"] = "eps-mse"
        """KL estimate: eps-mse, the element mean of the squared difference of the guided model outputs (the
        official code); gaussian, the closed form ||mu - mu_pre||^2 / (2 sigma_t^2) per element."""
        ratio_clip: float = pydantic.Field(1e-4, gt=0)
        """The likelihood ratio is clamped to 1 +- ratio_clip (no gradient outside) (official: 1e-4)."""
        value_baseline: bool = True
        """Advantage r - V(x_t, prompt, step) with a learned value network (official default); false: the
        trainer's normalised rewards."""
        value_lr: float = pydantic.Field(1e-4, gt=0)
        """AdamW learning rate of the value network (official: 1e-4)."""
        value_batch_size: int = pydantic.Field(256, ge=1)
        """Random transitions per value micro-batch (official: 256)."""
        value_micro_batches: int = pydantic.Field(5, ge=1)
        """Value micro-batches accumulated into one optimizer step (official: 5)."""
        value_steps: int = pydantic.Field(1, ge=1)
        """Value optimizer steps per epoch, before the policy update (official: 1 per round of sampling)."""

    def setup(self, run):
        """Create and register the value network; its input size comes from the model (the state's shape and
        the width of an encoded prompt, none for unconditional models)."""
        if not self.options.value_baseline:
            return
        import torch

        from ddpo.core.critic import StepValueNetwork, prompt_vector

        prompts = prompt_vector(run.model.encode_prompts([""]))
        prompt_dim = 0 if prompts is None else prompts.shape[-1]
        network = StepValueNetwork(run.model.sample_shape(), prompt_dim, run.config.sample.num_steps)
        optimizer = torch.optim.AdamW(network.parameters(), lr=self.options.value_lr)
        self.value, _ = run.register_module("value", network, optimizer)

    def compute_advantages(self, run, trajectory):
        """Without the value baseline, DDPO's normalised rewards. With it, A = r - V(x_t) needs the value step
        first, so `update` sets the advantages; until then they are zero."""
        import torch

        if self.options.value_baseline:
            return torch.zeros_like(trajectory.rewards)
        return run.default_advantages(trajectory)

    def update(self, run, trajectory):
        from ddpo.core.policy import EpochStatistics, gaussian_kl, policy_update

        options, statistics = self.options, EpochStatistics()
        if options.value_baseline:
            self._fit_value(run, trajectory, statistics)
            trajectory.advantages = self._baselined_advantages(run, trajectory)

        def loss(transitions, step):
            reference = step.reference()
            kl = (eps_mse_kl(step.model_output, reference.model_output) if options.kl_mode == "eps-mse"
                  else gaussian_kl(step.mean, reference.mean, step.std))
            total, policy_term, kl_term = dpok_loss(step.log_prob, transitions.log_probs, transitions.advantages, kl,
                                                    options.reward_weight, options.kl_weight, options.ratio_clip)
            return total, {"loss/policy": policy_term, "loss/kl": kl_term, "loss/total": total,
                           "policy/kl_to_reference": kl.mean()}

        return policy_update(run, trajectory, loss, clip_range=options.ratio_clip, statistics=statistics,
                             reference=("model_output",) if options.kl_mode == "eps-mse" else ("mean",))

    def _fit_value(self, run, trajectory, statistics) -> None:
        """`value_steps` AdamW steps of the value network on the MSE to the final reward, each accumulated over
        `value_micro_batches` batches of transitions drawn at random (with replacement) from the policy steps of
        this epoch's trajectories."""
        import torch

        from ddpo.core.critic import prompt_vector

        options = self.options
        prompts = prompt_vector(trajectory.prompt_embeds)
        generator = run.generator("value")
        policy_steps = trajectory.policy_steps[0].nonzero().flatten().cpu()
        accumulator = run.accumulator(options.value_micro_batches, modules=("value",))
        device = trajectory.latents.device
        for _ in range(options.value_steps * options.value_micro_batches):
            samples = torch.randint(trajectory.batch_size, (options.value_batch_size,), generator=generator)
            steps = policy_steps[torch.randint(len(policy_steps), (options.value_batch_size,), generator=generator)]
            samples, steps = samples.to(device), steps.to(device)
            with accumulator.micro_step():
                values = self.value(trajectory.latents[samples, steps], steps,
                                    None if prompts is None else prompts[samples])
                loss = ((values - trajectory.rewards[samples].float()) ** 2).mean()
                accumulator.backward(loss)
            statistics.add({"loss/value": loss.item()})
        accumulator.check_finished()

    def _baselined_advantages(self, run, trajectory):
        """(B, T) advantages r - V(x_t, c, k) of every step k, under the value network just fitted, clipped to
        +-advantage.clip_max like every advantage of the framework."""
        import torch

        from ddpo.core.critic import prompt_vector

        prompts = prompt_vector(trajectory.prompt_embeds)
        columns = []
        with torch.no_grad():
            for step in range(trajectory.num_steps):
                steps = torch.full((trajectory.batch_size,), step, dtype=torch.long, device=trajectory.latents.device)
                columns.append(self.value(trajectory.latents[:, step], steps, prompts))
        clip = run.config.advantage.clip_max
        return (trajectory.rewards.float()[:, None] - torch.stack(columns, dim=1)).clamp(-clip, clip)


@ddpo.hookimpl
def register_algorithms(register):
    register(DPOK)
