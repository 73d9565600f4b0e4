"""The rollout engine: per-step log-probs, batched guidance, shared initial noise, and rewards computed while
the next batch samples."""

import random
import time

import pytest
import torch

import ddpo
from ddpo.core.config import SampleConfig
from ddpo.core.rollout import RolloutEngine, sample_batch
from ddpo.plugins.models.ddpm import PixelDDPM
from ddpo.plugins.models.sd import StableDiffusion
from ddpo.plugins.prompts import SimpleAnimals


def loaded(model_cls, directory):
    """A model plugin loaded on the CPU and set up for training (LoRA for SD, all weights for DDPM)."""
    model = model_cls({"pretrained": str(directory)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    return model


@pytest.fixture(scope="module")
def sd_model(tiny_sd):
    return loaded(StableDiffusion, tiny_sd)


@pytest.fixture(scope="module")
def ddpm_model(tiny_ddpm):
    return loaded(PixelDDPM, tiny_ddpm)


class SlowReward(ddpo.Reward):
    """Takes a fixed time per batch, like a reward model or a remote service."""

    name = "slow"
    seconds = 0.4

    def __call__(self, images, prompts, metadata):
        time.sleep(self.seconds)
        return images.mean(dim=(1, 2, 3))


def test_rewards_overlap_the_sampling_of_the_next_batch(ddpm_model):
    config = SampleConfig(batch_size=4, batches_per_epoch=3, num_steps=25, eta=1.0, guidance_scale=1.0)
    engine = RolloutEngine(ddpm_model, SlowReward(), SimpleAnimals(), config)
    started = time.perf_counter()
    trajectory, images = engine.collect(torch.Generator().manual_seed(0), random.Random(0))
    elapsed = time.perf_counter() - started
    engine.close()
    spans = {(kind, index): (start, end) for kind, index, start, end in engine.timeline}
    for index in range(2):
        reward_start, reward_end = spans["reward", index]
        sample_start, sample_end = spans["sample", index + 1]
        assert reward_start < sample_end and sample_start < reward_end, f"reward {index} did not overlap sampling"
    serial = sum(end - start for start, end in spans.values())
    assert elapsed < serial - 0.3, (elapsed, serial)
    assert trajectory.rewards.shape == (12,) and images.shape == (12, 3, 16, 16)
    assert torch.allclose(trajectory.rewards, images.mean(dim=(1, 2, 3)))


def recomputed_log_probs(model, trajectory, eta):
    """(B, T) each step's log-probability recomputed from the recorded step (0 where it is not a policy step)."""
    columns = []
    with torch.no_grad():
        for step in range(trajectory.num_steps):
            log_prob, *_ = model.step_log_prob(trajectory.transitions(torch.full((trajectory.batch_size,), step)),
                                               eta, 1.0)
            columns.append(torch.where(trajectory.policy_steps[:, step], log_prob, torch.zeros_like(log_prob)))
    return torch.stack(columns, dim=1)


def test_ddim_from_a_ddpm_config_keeps_the_deterministic_last_step_out(ddpm_model):
    trajectory, _ = sample_batch(ddpm_model, [""] * 3, [{}] * 3, num_steps=10, eta=1.0, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert trajectory.policy_steps[:, :-1].all() and not trajectory.policy_steps[:, -1].any()
    # the recorded log-probs are those of the steps taken, and the deterministic step's is 0, not NaN
    assert torch.equal(trajectory.log_probs, recomputed_log_probs(ddpm_model, trajectory, 1.0))
    assert (trajectory.log_probs[:, -1] == 0).all() and (trajectory.log_probs[:, :-1] != 0).all()
    assert trajectory.latents.shape == (3, 11, 3, 16, 16) and trajectory.timesteps[0, -1] == 0


def test_groups_share_initial_noise_and_diverge_through_step_noise(sd_model):
    trajectory, _ = sample_batch(sd_model, ["cat", "cat", "dog", "dog"], [{}] * 4, num_steps=4, eta=1.0,
                                 guidance_scale=5.0, generator=torch.Generator().manual_seed(0), group_size=2)
    start = trajectory.latents[:, 0]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    assert not torch.equal(trajectory.latents[0, -1], trajectory.latents[1, -1])
    assert trajectory.group_ids.tolist() == [0, 0, 1, 1]


def test_guidance_is_one_batched_unet_call_per_step_and_prompts_are_encoded_once(sd_model):
    unet_batches, encoder_calls = [], []
    unet_hook = sd_model.denoiser.register_forward_hook(lambda module, args, out: unet_batches.append(args[0].shape[0]))
    text_hook = sd_model.text_encoder.register_forward_hook(lambda *_: encoder_calls.append(1))
    try:
        trajectory, _ = sample_batch(sd_model, ["cat", "dog", "fox"], [{}] * 3, num_steps=5, eta=1.0,
                                     guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    finally:
        unet_hook.remove()
        text_hook.remove()
    assert unet_batches == [6] * 5 and len(encoder_calls) == 1
    assert trajectory.prompt_embeds.shape == (3, 16, 32)


@pytest.mark.parametrize("train_batch", [4, 2])
def test_policy_ratio_is_one_before_the_first_update(sd_model, train_batch):
    """Recomputed in the sampling batch, the log-probs are the sampled ones bit for bit; in a batch of another size
    the CPU's matrix kernels may block the sums differently (on an Intel Xeon, |rho - 1| up to ~1e-6), so
    there they agree to float32 rounding. A wrong timestep, noise or guidance is off by far more than 1e-5."""
    sd_model.denoiser.eval()
    trajectory, _ = sample_batch(sd_model, ["cat", "dog", "fox", "owl"], [{}] * 4, num_steps=6, eta=1.0,
                                 guidance_scale=5.0, generator=torch.Generator().manual_seed(3))
    sd_model.denoiser.train()
    trajectory.advantages = torch.zeros(4)
    with torch.no_grad():
        for transitions in trajectory.training_transitions(train_batch, torch.Generator().manual_seed(0)):
            log_prob, *_ = sd_model.step_log_prob(transitions, eta=1.0, guidance_scale=5.0)
            ratio = torch.exp(log_prob - transitions.log_probs)
            if train_batch == 4:
                assert torch.equal(ratio, torch.ones(train_batch))
            assert (ratio - 1).abs().max() < 1e-5, ratio


def test_ddpm_ancestral_sampler_records_log_probs_and_skips_the_noiseless_last_step(tiny_ddpm):
    model = PixelDDPM({"pretrained": str(tiny_ddpm), "scheduler": "ddpm"})
    model.load(torch.device("cpu"), torch.float32)
    trajectory, images = sample_batch(model, [""] * 2, [{}] * 2, num_steps=8, eta=0.0, guidance_scale=1.0,
                                      generator=torch.Generator().manual_seed(0))
    assert type(model.scheduler).__name__ == "DDPMScheduler"
    assert trajectory.policy_steps[:, :-1].all() and not trajectory.policy_steps[:, -1].any()
    assert torch.equal(trajectory.log_probs, recomputed_log_probs(model, trajectory, 0.0))
    assert (trajectory.log_probs[:, :-1] != 0).all() and (trajectory.log_probs[:, -1] == 0).all()
    assert images.shape == (2, 3, 16, 16)
