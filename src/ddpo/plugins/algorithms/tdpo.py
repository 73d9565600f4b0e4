"""TDPO and TDPO-R: Confronting Reward Overoptimization for Diffusion Models: A Perspective of Inductive and
Primacy Biases (Zhang et al., ICML 2024, arXiv 2402.08552; official code ZiyiZhang27/tdpo).

TDPO gives each denoising step its own advantage through a temporal critic V(x_t), a value of the
intermediate state alone (no timestep, no prompt): the official input is the L2-normalised CLIP image
embedding of the VAE-decoded x_t, read by an MLP head in→1024→128→64→16→1 with dropout and no activations,
whose weights are all drawn N(0, 1/(w+1)), w the embedding's width (768 for ViT-L/14; critic_model.py:33).

    R      = per-prompt normalised final reward (DDPO's advantage), the same for every step (γ = 1)
    Â_t    = R − V_old(x_t)                      V_old: the critic when the epoch was sampled
    A_t    = (Â_t − mean Â) / (std Â + 1e-8)     over the whole batch × steps, all processes
    ρ      = exp(log p_θ(x_{t−1} | x_t, c) − log p_old)
    L      = mean(max(−A_t ρ, −A_t clip(ρ, 1 ± 1e-4))) + c_v · 0.5 · mean(max((V − R)², (clip(V, V_old ± 0.2) − R)²))

with c_v = 1. The update order is TDPO's temporal one: for each step position, every minibatch (accumulating
`train.grad_accum` minibatches per optimizer step, the critic trained jointly with the policy), so an epoch
makes many small steps; the paper's SD 1.4 recipe is 256 samples per epoch, train batch 1 with 16-step
accumulation per GPU, policy and critic lr 1e-4, 100 epochs.

TDPO-R adds neuron resets against primacy bias: every `reset_every` epochs (10) the critic's ACTIVE neurons —
those whose activity score on a probe batch is above τ = 0 (`ddpo.core.neurons`) — are re-drawn with the
initialisation's std (neuron_recycler.py:140 and :174) and their AdamW moments zeroed; the policy is never
reset. `reset_mode=dormant` resets the dormant ones instead (ReDo).
The paper measures over-optimisation by cross-reward evaluation: train on one reward, log the others
(`eval.rewards`).

Not in the paper: the same optional KL penalty to the pretrained model as DDPO-IS's (DPOK's Gaussian form on
each trained step, L += beta mean(KL(p_theta(. | x_t) || p_pre(. | x_t)))); beta = 0, the default, is the paper's
loss with no reference pass.
"""

from __future__ import annotations

from typing import Literal

import pydantic

import ddpo


class TemporalDPO(ddpo.Algorithm):
    """TDPO: PPO clip with per-step advantages from a temporal critic V(x_t) (Zhang et al. 2024)."""

    name = "tdpo"
    run_defaults = {"train": {"learning_rate": 1e-4, "batch_size": 1, "grad_accum": 16}}
    # On digits: pixel features (no CLIP offline); the temporal order makes an optimizer step per trained step
    # position, so a smaller lr and half the positions (lr 3e-4 or all 19 positions collapsed the model within
    # 12 epochs), PPO's 0.2 clip (1e-4 stalls), and a faster critic (at 1e-4 explained variance stayed ~0).
    # The demo's KL to the base model (0.1, as ddpo-is's): without it target 8, seed 1 lost every 8 after the
    # first update (0.14 -> 0.0001), and with rewards all near 0 the normalised advantages were noise that wore
    # legibility down to 0.17 by epoch 9; with it, 0.14 -> 0.35, legibility 0.96-0.99.
    model_run_defaults = {
        "digits": {
            "algorithm": {"name": "tdpo", "critic_features": "pixels", "clip_range": 0.2, "critic_lr": 1e-3,
                          "kl_weight": 0.1},
            "train": {"batch_size": 32, "grad_accum": 2, "learning_rate": 1e-4, "timestep_fraction": 0.5},
        },
    }

    class Options(ddpo.Options):
        clip_range: float = pydantic.Field(1e-4, gt=0)
        """PPO clip range on the per-step ratio (paper: 1e-4)."""
        critic_features: Literal["clip", "pixels"] = "clip"
        """What the critic reads of x_t: the decoded image's CLIP embedding (paper), or its pixels (offline, CPU)."""
        clip_model: str = "openai/clip-vit-large-patch14"
        """CLIP for `critic_features=clip`, hub id or local directory (shared with an `aesthetic` reward's)."""
        critic_lr: float = pydantic.Field(1e-4, gt=0)
        """AdamW learning rate of the critic (paper: 1e-4)."""
        value_clip: float = pydantic.Field(0.2, gt=0)
        """Clip range of the value loss around the sampling-time values (paper: 0.2)."""
        value_coef: float = pydantic.Field(1.0, ge=0)
        """Weight of the value loss in the joint loss (paper: 1.0)."""
        critic_init: Literal["paper", "per-layer"] = "paper"
        """Std of the critic MLP's weights when drawn (initialisation and resets): `paper`, 1/(w+1) for every layer
        with w the MLP's input width (official code: critic_model.py:33, neuron_recycler.py:140 and :174), or
        `per-layer`, 1/(in+1) with each layer's own input width."""
        kl_weight: float = pydantic.Field(0.0, ge=0)
        """Weight beta of the KL to the pretrained model on each step's Gaussian (not in TDPO; 0 skips the
        reference pass)."""

    def __init__(self, options=None):
        super().__init__(options)
        self.explained_variance = float("nan")

    @property
    def needs_reference(self) -> bool:
        return self.options.kl_weight > 0

    def setup(self, run):
        import torch

        from ddpo.core.critic import CriticFeatures, TemporalCriticHead

        self.features = CriticFeatures(self.options.critic_features, self.options.clip_model)
        self.features.load(run.model, run.reward, run.accelerator.device)
        head = TemporalCriticHead(self.features.feature_dim, self.features.pixel_shape, self.options.critic_init)
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.options.critic_lr, weight_decay=1e-4)
        self.critic, self.critic_optimizer = run.register_module("critic", head, optimizer)

    def compute_advantages(self, run, trajectory):
        """Features and sampling-time values of every state, then the per-step advantages (B, T)."""
        import torch

        from ddpo.core.critic import explained_variance

        states = trajectory.latents
        batch, count = states.shape[:2]
        trajectory.features = self.features(run.model, states.flatten(0, 1)).reshape(batch, count, -1)
        returns = run.default_advantages(trajectory)
        self.critic.eval()
        with torch.no_grad():
            values = self.critic(trajectory.features[:, :-1].flatten(0, 1)).reshape(batch, count - 1)
        trajectory.values = values
        trajectory.extras["returns"] = returns
        policy = trajectory.policy_steps
        residuals = returns[:, None] - values
        gathered = run.accelerator.gather(residuals[policy].to(run.accelerator.device))
        all_returns = run.accelerator.gather(returns[:, None].expand_as(values)[policy].to(run.accelerator.device))
        all_values = run.accelerator.gather(values[policy].to(run.accelerator.device))
        self.explained_variance = explained_variance(all_values, all_returns)
        advantages = (residuals - gathered.mean()) / (gathered.std(unbiased=False) + 1e-8)
        return torch.where(policy, advantages, torch.zeros_like(advantages))

    def update(self, run, trajectory):
        from ddpo.core.critic import clipped_value_loss
        from ddpo.core.policy import EpochStatistics, clipped_surrogate, kl_to_reference, policy_update

        options, statistics = self.options, EpochStatistics()

        def loss(transitions, step):
            policy_loss, _ = clipped_surrogate(step.log_prob, transitions.log_probs, transitions.advantages,
                                               options.clip_range)
            values = self.critic(transitions.features)
            value_loss = clipped_value_loss(values, transitions.values, transitions.extras["returns"],
                                            options.value_clip)
            total = policy_loss + options.value_coef * value_loss
            if options.kl_weight > 0:
                kl = kl_to_reference(run.model, transitions, step.mean, step.std, run.config.sample, statistics,
                                     reference_mean=step.reference().mean)
                total = total + options.kl_weight * kl
            return total, {"loss/policy": policy_loss, "loss/value": value_loss, "critic/loss": value_loss,
                           "loss/total": total}

        self.critic.train()
        summary = policy_update(run, trajectory, loss, clip_range=options.clip_range, statistics=statistics,
                                temporal=True, modules=("policy", "critic"),
                                reference=("mean",) if options.kl_weight > 0 else ())
        summary["critic/explained_variance"] = self.explained_variance
        summary.update(self.neuron_statistics(run, trajectory))
        return summary

    def probe_features(self, run, trajectory):
        """The probe batch of the neuron scores: the first `sample.batch_size` trajectories, each at one random
        step (seeded per epoch)."""
        import torch

        count = min(run.config.sample.batch_size, trajectory.batch_size)
        steps = torch.randint(0, trajectory.num_steps, (count,), generator=run.generator("probe"))
        return trajectory.features[torch.arange(count), steps.to(trajectory.features.device)]

    def neuron_statistics(self, run, trajectory) -> dict[str, float]:
        """`critic/active_fraction` and `critic/dormant_fraction` of the critic's hidden neurons on the probe."""
        import torch

        from ddpo.core.neurons import dormant_masks, neuron_scores

        critic = run.accelerator.unwrap_model(self.critic)
        with torch.no_grad():
            probe = critic.mlp_inputs(self.probe_features(run, trajectory))
        self.scores = neuron_scores(critic.mlp, (probe,), reduce=lambda means: run.accelerator.reduce(means, "mean"))
        dormant = torch.cat(dormant_masks(self.scores, self.tau())).float().mean().item()
        return {"critic/dormant_fraction": dormant, "critic/active_fraction": 1 - dormant}

    def tau(self) -> float:
        return 0.0


class TemporalDPORegularized(TemporalDPO):
    """TDPO-R: TDPO whose critic's active neurons are reset periodically, against primacy bias (Zhang et al. 2024)."""

    name = "tdpo-r"
    model_run_defaults = {
        "digits": {**TemporalDPO.model_run_defaults["digits"],
                   "algorithm": {**TemporalDPO.model_run_defaults["digits"]["algorithm"], "name": "tdpo-r"}},
    }

    class Options(TemporalDPO.Options):
        reset_every: int = pydantic.Field(10, ge=1)
        """Reset the critic's neurons after every N-th epoch (paper: 10)."""
        reset_mode: Literal["active", "dormant"] = "active"
        """Which neurons to reset: the active ones (TDPO-R) or the dormant ones (ReDo)."""
        tau: float = pydantic.Field(0.0, ge=0)
        """Dormancy threshold on the normalised activity score: dormant when score <= tau (paper: 0)."""

    def __init__(self, options=None):
        super().__init__(options)
        self.resets = 0

    def tau(self) -> float:
        return self.options.tau

    def update(self, run, trajectory):
        import torch

        from ddpo.core.neurons import reset_neurons
        from ddpo.core.run import derive_seed

        summary = super().update(run, trajectory)
        if run.epoch % self.options.reset_every == 0:
            # the same draw on every process, so the critic's replicas stay identical
            generator = torch.Generator().manual_seed(derive_seed(run.config.seed, run.epoch, "neuron-reset"))
            critic = run.accelerator.unwrap_model(self.critic)
            reset_neurons(critic.mlp, self.reset_masks(self.scores), self.critic_optimizer, generator,
                          critic.weight_std)
            self.resets += 1
        summary["critic/resets"] = float(self.resets)
        return summary

    def reset_masks(self, scores):
        """Per hidden layer of the critic, True for the neurons a reset re-draws given their activity `scores`: the
        active ones (score > tau; TDPO-R) or the dormant ones (ReDo)."""
        from ddpo.core.neurons import dormant_masks

        dormant = dormant_masks(scores, self.options.tau)
        return dormant if self.options.reset_mode == "dormant" else [~mask for mask in dormant]

    def state_dict(self):
        return {"resets": self.resets}

    def load_state_dict(self, state):
        self.resets = int(state["resets"])


@ddpo.hookimpl
def register_algorithms(register):
    register(TemporalDPO)
    register(TemporalDPORegularized)
