"""Reward normalisation into advantages (DESIGN.md §8).

DDPO family: a per-prompt running buffer of rewards (size 32, min_count 16); until a prompt has min_count
rewards the whole batch's mean and std are used; A = (r - mean) / (std + 1e-6), clipped to +-clip_max.
GRPO family: each group (the images of one prompt, sampled together) is its own baseline,
A = (r - group mean) / (group std + 1e-4), or the epoch's std with `global_std` (Flow-GRPO's configs).
"""

from __future__ import annotations

from collections import deque

import numpy as np

EPSILON = 1e-6


class PerPromptStatTracker:
    """Running per-prompt reward statistics that persist across epochs (and checkpoints)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add this epoch's rewards (N,) and return their normalised advantages (N,) float64."""
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        prompt_array = np.array(prompts, dtype=object)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        for prompt in dict.fromkeys(prompts):
            selected = prompt_array == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[selected].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buffer), np.std(buffer)
            advantages[selected] = (rewards[selected] - mean) / (std + EPSILON)
        return advantages

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + 1e-6) over the whole batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + EPSILON)



def group_advantages(rewards: np.ndarray, group_keys, global_std: bool = False,
                     epsilon: float = 1e-4) -> tuple[np.ndarray, int]:
    """Group-relative advantages (N,) float64 for rewards (N,) and what makes their groups (N,): group ids, or
    prompts for Flow-GRPO's per-prompt groups; and the number of groups whose rewards are all equal (their
    advantages are 0: they teach nothing). With `global_std`, every group divides by the std of all N rewards."""
    rewards = np.asarray(rewards, dtype=np.float64)
    group_keys = np.asarray(group_keys)
    advantages = np.empty_like(rewards)
    zero_std_groups = 0
    for group in np.unique(group_keys):
        members = group_keys == group
        centred = rewards[members] - rewards[members].mean()
        zero_std_groups += int(np.all(centred == 0))
        std = rewards.std() if global_std else rewards[members].std()
        advantages[members] = centred / (std + epsilon)
    return advantages, zero_std_groups


def epoch_group_advantages(run, trajectory, group_by: str, global_std: bool):
    """This process's group-relative advantages (B,) float32 on the trajectory's device, computed from every
    process's rewards of the epoch (`run.gathered_rewards`), grouped by prompt string (`group_by` "prompt",
    Flow-GRPO) or by the sampled groups' ids ("group"); and the number of groups whose rewards are all equal."""
    import torch

    if group_by == "prompt":
        keys = run.gathered_prompts
    else:
        keys = run.accelerator.gather(trajectory.group_ids.to(run.accelerator.device)).cpu().numpy()
    advantages, zero_std_groups = group_advantages(run.gathered_rewards.numpy(), keys, global_std)
    local = run.local_part(torch.as_tensor(advantages, dtype=torch.float32)).to(trajectory.latents.device)
    return local, zero_std_groups
