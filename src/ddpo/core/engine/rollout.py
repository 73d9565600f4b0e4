"""The rollout engine: sample trajectories with per-step log-probabilities and score them.

Rewards are computed in a thread pool while the next batch samples (the reward of batch i overlaps the
denoising of batch i+1); `RolloutEngine.timeline` records when each happened so the overlap can be checked.
"""

from __future__ import annotations

import contextlib
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ddpo.core.configuration.config import SampleConfig
from ddpo.core.engine.multireward import EXTRAS_PREFIX, MultiReward
from ddpo.core.engine.onpolicy import SamplingGradients
from ddpo.core.engine.profiling import PHASES
from ddpo.core.plugin_api.base import PromptSet, Reward
from ddpo.core.plugin_api.model import Model
from ddpo.core.plugin_api.schema import Trajectory


STEP_MEANS = "rollout/step_means"
"""The `Trajectory.extras` key of each step's mean under the sampling policy (B, T, C, H, W), kept when the
algorithm asks (`Algorithm.needs_step_means`)."""


@torch.no_grad()
def sample_batch(model: Model, prompts: list[str], metadata: list[dict], *, num_steps: int, eta: float,
                 guidance_scale: float, generator: torch.Generator, group_size: int = 1,
                 first_group_id: int = 0, initial_noise: torch.Tensor | None = None,
                 gradients: SamplingGradients | None = None, sde_window: tuple[int, int] | None = None,
                 keep_means: bool = False) -> tuple[Trajectory, torch.Tensor]:
    """Sample one batch of trajectories.

    Consecutive runs of `group_size` samples share their initial noise x_T (give them the same prompt);
    they differ only by the noise of the stochastic steps. `initial_noise` (B, C, H, W), if given, is x_T
    instead (then `group_size` only numbers the groups). With `gradients` (inside its `batch` context), each
    step's forward pass keeps its graph and the per-sample gradients of the stochastic steps' log-probs
    accumulate there (`ddpo.core.engine.onpolicy`); the samples drawn are the same. With `sde_window` (first, stop),
    only the steps first <= step < stop use `eta`; the others take the deterministic step (eta 0) and are no
    policy steps (`sample.sde_window`). With `keep_means`, each step's Gaussian mean is kept in
    `trajectory.extras[STEP_MEANS]` (B, T, C, H, W) float32, the sampling policy's mean of every transition.

    Returns:
        The trajectory (B samples, T = num_steps) without rewards, and the decoded images (B, 3, H, W) in [0, 1]
        (videos: (B, 3, F, H, W)).
    """
    batch_size = len(prompts)
    if batch_size % group_size:
        raise ValueError(f"batch of {batch_size} is not a multiple of the group size {group_size}")
    prompt_embeds = model.encode_prompts(prompts)
    timesteps, prev_timesteps = model.set_timesteps(num_steps)
    sample = (model.initial_noise(batch_size // group_size, generator).repeat_interleave(group_size, dim=0)
              if initial_noise is None else initial_noise.to(model.device))
    states, log_probs, policy_steps, means = [sample], [], [], []
    for index, (timestep, prev_timestep) in enumerate(zip(timesteps, prev_timesteps, strict=True)):
        step_eta = eta if sde_window is None or sde_window[0] <= index < sde_window[1] else 0.0
        step_timesteps = timestep.repeat(batch_size)
        step_prev_timesteps = prev_timestep.repeat(batch_size)
        if gradients is None:
            output = model.predict_noise(sample, step_timesteps, prompt_embeds, guidance_scale)
            sample, log_prob, mean, std = model.step(output, step_timesteps, step_prev_timesteps, sample, step_eta,
                                                     generator=generator)
            stochastic = (std > 0).reshape(-1).expand(batch_size)
        else:
            with torch.enable_grad():
                output = model.predict_noise(sample, step_timesteps, prompt_embeds, guidance_scale)
                next_sample, _, mean, std = model.step(output.detach(), step_timesteps, step_prev_timesteps, sample,
                                                       step_eta, generator=generator)
                # the log-prob of the drawn x_{t-1} as training computes it: a function of the output only
                _, log_prob, _, _ = model.step(output, step_timesteps, step_prev_timesteps, sample, step_eta,
                                               prev_sample=next_sample)
                stochastic = (std > 0).reshape(-1).expand(batch_size)
                if stochastic.any():
                    gradients.backward(log_prob[stochastic])
            sample, log_prob = next_sample, log_prob.detach()
        states.append(sample)
        if keep_means:
            means.append(mean.detach())
        log_probs.append(torch.where(stochastic, log_prob, torch.zeros_like(log_prob)))
        policy_steps.append(stochastic)
    with torch.profiler.record_function(PHASES["decode"]):
        images = model.decode(sample)
    trajectory = Trajectory(
        latents=torch.stack(states, dim=1),
        timesteps=timesteps.repeat(batch_size, 1),
        log_probs=torch.stack(log_probs, dim=1),
        policy_steps=torch.stack(policy_steps, dim=1),
        prompts=list(prompts),
        prompt_metadata=list(metadata),
        prev_timesteps=prev_timesteps.repeat(batch_size, 1),
        prompt_embeds=prompt_embeds,
        group_ids=torch.arange(batch_size, device=sample.device) // group_size + first_group_id,
        extras={STEP_MEANS: torch.stack(means, dim=1)} if keep_means else {},
    )
    return trajectory, images


def score(reward: Reward, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Call a reward plugin and check its answer: (B,) finite float32 on the CPU.

    `images` (B, 3, H, W) are scored as they are. Videos (B, 3, F, H, W) are scored frame by frame: the reward sees
    the B x F frames (B, 3, H, W)-shaped, video-major, each with its video's prompt and metadata, in one call, and a
    video's reward is the mean of its frames' (as Flow-Factory scores videos with image rewards)."""
    if images.ndim == 5:
        frames = images.shape[2]
        frame_prompts = [prompt for prompt in prompts for _ in range(frames)]
        frame_metadata = [entry for entry in metadata for _ in range(frames)]
        per_frame = score(reward, images.transpose(1, 2).flatten(0, 1), frame_prompts, frame_metadata)
        return per_frame.reshape(len(prompts), frames).mean(dim=1)
    with torch.no_grad():
        values = reward(images, prompts, metadata)
    values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if values.shape != (len(prompts),):
        raise RuntimeError(f"reward '{reward.name}' returned shape {tuple(values.shape)} for a batch of "
                           f"{len(prompts)}; expected ({len(prompts)},)")
    if not torch.isfinite(values).all():
        raise RuntimeError(f"reward '{reward.name}' returned non-finite values: {values.tolist()}")
    return values


def _one_intra_op_thread() -> None:
    """Run a reward worker's CPU tensor ops on one thread. With OpenMP, a second Python thread running torch
    ops on the full thread count made the main thread's sampling and training 2.6x slower on a 2-core CPU,
    for good (measured on the digits demo). The setting is per thread: the main thread keeps all of them."""
    torch.set_num_threads(1)


class RolloutEngine:
    """Samples an epoch's trajectories batch by batch and scores each batch in a worker thread.

    With `gradients` (`train.gradient_from_sampling`), the first `gradient_batches` batches of an epoch also
    collect their per-sample gradients there, for `gradients.take()`.

    Groups (`group_size` k > 1) are the images of one prompt, sampled from one initial noise unless
    `share_group_noise` is False. A group of at most one batch lives in one batch; a larger group (GRPO's
    24 images with batches of 8) spans consecutive batches and processes: then every process draws the epoch's
    prompts and initial noises from the same shared streams and takes its own slice of them.
    """

    def __init__(self, model: Model, reward: Reward, prompt_set: PromptSet, sample_config: SampleConfig,
                 group_size: int = 1, reward_workers: int = 2, process_index: int = 0, num_processes: int = 1,
                 share_group_noise: bool = True, gradients: SamplingGradients | None = None,
                 gradient_batches: int = 0, keep_means: bool = False):
        self.model = model
        self.reward = reward
        self.prompt_set = prompt_set
        self.config = sample_config
        self.group_size = group_size
        self.process_index = process_index
        """Group ids are numbered from this process's block, so they are unique across processes."""
        self.num_processes = num_processes
        self.share_group_noise = share_group_noise
        self.gradients = gradients
        self.gradient_batches = gradient_batches
        """The first batches of an epoch that collect per-sample gradients into `gradients`."""
        self.keep_means = keep_means
        """Keep each step's mean in the trajectories (`sample_batch`'s `keep_means`)."""
        if group_size > sample_config.batch_size:
            total = sample_config.batch_size * sample_config.batches_per_epoch * num_processes
            if total % group_size:
                raise ValueError(f"{total} samples per epoch over {num_processes} process(es) do not make whole "
                                 f"groups of {group_size}")
        self.executor = ThreadPoolExecutor(max_workers=reward_workers, thread_name_prefix="ddpo-reward",
                                           initializer=_one_intra_op_thread)
        self.timeline: list[tuple[str, int, float, float]] = []
        """(what, batch index, start, end) in time.perf_counter() seconds, for the last `collect`."""

    def draw_prompts(self, rng: random.Random) -> tuple[list[str], list[dict]]:
        """One batch of prompts, each drawn prompt repeated `group_size` times."""
        drawn = [self.prompt_set.sample(rng) for _ in range(self.config.batch_size // self.group_size)]
        prompts = [prompt for prompt, _ in drawn for _ in range(self.group_size)]
        metadata = [dict(meta) for _, meta in drawn for _ in range(self.group_size)]
        if not self.model.conditional:
            prompts = [""] * len(prompts)
        return prompts, metadata

    def _timed_score(self, index: int, images, prompts, metadata) -> torch.Tensor:
        start = time.perf_counter()
        with torch.profiler.record_function(PHASES["reward"]):
            rewards = (self.reward.score_components(images, prompts, metadata)
                       if isinstance(self.reward, MultiReward) else score(self.reward, images, prompts, metadata))
        self.timeline.append(("reward", index, start, time.perf_counter()))
        return rewards

    def _batches(self, generator: torch.Generator, rng: random.Random, shared_rng: random.Random | None,
                 shared_generator: torch.Generator | None):
        """The epoch's batches as (prompts, metadata, initial noise (B, C, H, W), group ids (B,)), lazily."""
        size, count, group = self.config.batch_size, self.config.batches_per_epoch, self.group_size
        if group <= size:
            for index in range(count):
                prompts, metadata = self.draw_prompts(rng)
                noise = self.model.initial_noise(size // group if self.share_group_noise else size, generator)
                if self.share_group_noise:
                    noise = noise.repeat_interleave(group, dim=0)
                first = (self.process_index * count + index) * (size // group)
                yield prompts, metadata, noise, torch.arange(size) // group + first
            return
        if shared_rng is None or shared_generator is None:
            raise ValueError(f"groups of {group} span batches of {size}: give collect() the shared streams")
        local = size * count
        drawn = [self.prompt_set.sample(shared_rng) for _ in range(local * self.num_processes // group)]
        group_noise = self.model.initial_noise(len(drawn), shared_generator)
        for index in range(count):
            members = torch.arange(size) + self.process_index * local + index * size  # global sample indices
            groups = members // group
            prompts = [drawn[g][0] if self.model.conditional else "" for g in groups.tolist()]
            metadata = [dict(drawn[g][1]) for g in groups.tolist()]
            noise = (group_noise[groups.to(group_noise.device)] if self.share_group_noise
                     else self.model.initial_noise(size, generator))
            yield prompts, metadata, noise, groups

    def collect(self, generator: torch.Generator, rng: random.Random, progress=None,
                shared_rng: random.Random | None = None, shared_generator: torch.Generator | None = None,
                sde_window: tuple[int, int] | None = None) -> tuple[Trajectory, torch.Tensor]:
        """Sample and score `batches_per_epoch` batches.

        `generator` and `rng` are this process's streams (step noise, prompts); `shared_rng` and
        `shared_generator`, the same on every process, draw the prompts and initial noises of groups larger
        than a batch. `sde_window` (first, stop): the epoch's stochastic steps, as `sample_batch`'s.

        Returns:
            The epoch's trajectories with `rewards` (B,) set, and their images (B, 3, H, W) on the CPU.
        """
        self.timeline = []
        parts: list[Trajectory] = []
        images: list[torch.Tensor] = []
        futures: list[Future] = []
        batches = self._batches(generator, rng, shared_rng, shared_generator)
        for index, (prompts, metadata, noise, group_ids) in enumerate(batches):
            start = time.perf_counter()
            gradients = self.gradients if index < self.gradient_batches else None
            with (torch.profiler.record_function(PHASES["sampling"]),  # the denoising loop, then decode
                  gradients.batch(len(prompts)) if gradients is not None else contextlib.nullcontext()):
                trajectory, batch_images = sample_batch(
                    self.model, prompts, metadata, num_steps=self.config.num_steps, eta=self.config.eta,
                    guidance_scale=self.config.guidance_scale, generator=generator, initial_noise=noise,
                    gradients=gradients, sde_window=sde_window, keep_means=self.keep_means)
            trajectory.group_ids = group_ids.to(trajectory.latents.device)
            self.timeline.append(("sample", index, start, time.perf_counter()))
            futures.append(self.executor.submit(self._timed_score, index, batch_images, prompts, metadata))
            parts.append(trajectory)
            images.append(batch_images.cpu())
            if progress is not None:
                progress.update(1)
        trajectory = Trajectory.cat(parts)
        scores = [future.result() for future in futures]
        if isinstance(self.reward, MultiReward):  # scores per component; the trainer combines them per epoch
            components = {label: torch.cat([batch[label] for batch in scores]) for label in scores[0]}
            trajectory.extras.update({f"{EXTRAS_PREFIX}{label}": values.to(trajectory.latents.device)
                                      for label, values in components.items()})
            scores = [self.reward.combine(components, normalize=False)]
        trajectory.rewards = torch.cat(scores).to(trajectory.latents.device)
        return trajectory, torch.cat(images)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
