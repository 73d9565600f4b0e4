"""The `wan` video model (Wan2.1 T2V) on a tiny random WanPipeline loaded through `from_pretrained`: it samples as
diffusers' WanPipeline does, its trajectories carry video latents (B, T+1, C, F', H', W') whose step log-probs
recompute to ratio one and reduce over every element of a state, rewards score a video as the mean of its
frames, and a grpo run writes the videos (GIFs in the run directory and TensorBoard) and a LoRA that the vanilla
pipeline loads."""

import json
import math

import pytest
import torch
from PIL import Image

from helpers import once_per_session
from ddpo.core.engine.rollout import sample_batch, score
from ddpo.core.math.policy import gaussian_kl
from ddpo.core.plugin_api.schema import Trajectory
from ddpo.plugins.models.wan import Wan
from ddpo.testing import build_tiny_wan

SIZE, FRAMES, TOKENS = 32, 5, 16
"""The tiny videos: 5 frames of 32 x 32 pixels, latents 16 x 2 x 4 x 4; 16 UMT5 tokens per prompt."""


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    return once_per_session(tmp_path_factory, "tiny-wan", build_tiny_wan)


def wan_options(pretrained, **changes):
    return {"pretrained": str(pretrained), "resolution": SIZE, "num_frames": FRAMES, "lora_rank": 4,
            "max_sequence_length": TOKENS, **changes}


@pytest.fixture(scope="module")
def wan_model(tiny_wan):
    model = Wan(wan_options(tiny_wan))
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    return model


def test_wan_refuses_frame_counts_and_sizes_its_vae_and_patches_cannot_take(tiny_wan):
    from ddpo.core.configuration.errors import UsageError

    with pytest.raises(UsageError, match=r"model.num_frames=6 must be 4k \+ 1 \(e.g. 5\)"):
        Wan(wan_options(tiny_wan, num_frames=6)).load(torch.device("cpu"), torch.float32)
    with pytest.raises(UsageError, match=r"height x width = 40 x 40 must be multiples of 16"):
        Wan(wan_options(tiny_wan, resolution=40)).load(torch.device("cpu"), torch.float32)


def test_wan_samples_as_the_diffusers_pipeline_on_the_same_schedule(wan_model, tiny_wan):
    """With no step noise (eta 0) our sampler is the Euler ODE on FlowMatchEulerDiscreteScheduler's shifted
    sigmas: WanPipeline with that scheduler, the same initial latents, prompts, negative prompt and guidance gives
    the same videos (it returns (B, F, 3, H, W); ours are (B, 3, F, H, W))."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    assert wan_model.sample_shape() == (16, 2, 4, 4) and wan_model.scheduler.config.shift == 3.0  # the hub's shift
    noise = wan_model.initial_noise(2, torch.Generator().manual_seed(0))
    trajectory, videos = sample_batch(wan_model, ["a red cat", "a dog"], [{}, {}], num_steps=3, eta=0.0,
                                      guidance_scale=4.5, generator=torch.Generator(), initial_noise=noise)
    assert trajectory.latents.shape == (2, 4, 16, 2, 4, 4) and not trajectory.policy_steps.any()
    assert videos.shape == (2, 3, FRAMES, SIZE, SIZE) and 0 <= videos.min() and videos.max() <= 1
    pipeline = WanPipeline.from_pretrained(tiny_wan)
    pipeline.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        frames = pipeline(["a red cat", "a dog"], negative_prompt="", height=SIZE, width=SIZE, num_frames=FRAMES,
                          num_inference_steps=3, guidance_scale=4.5, latents=noise.clone(), output_type="pt",
                          max_sequence_length=TOKENS).frames
    assert torch.allclose(videos, frames.transpose(1, 2), atol=1e-5), (videos - frames.transpose(1, 2)).abs().max()


def test_wan_steps_recompute_to_ratio_one_and_reduce_over_every_element_of_a_video_state(wan_model):
    trajectory, _ = sample_batch(wan_model, ["cat", "dog"], [{}, {}], num_steps=3, eta=0.7, guidance_scale=4.5,
                                 generator=torch.Generator().manual_seed(0))
    assert trajectory.latents.shape == (2, 4, 16, 2, 4, 4) and trajectory.policy_steps.all()
    wan_model.set_timesteps(50)  # an evaluation with more steps in between must not matter
    with torch.no_grad():
        for transitions in trajectory.training_transitions(2, torch.Generator().manual_seed(0)):
            log_prob, mean, std, _ = wan_model.step_log_prob(transitions, eta=0.7, guidance_scale=4.5)
            assert torch.equal(torch.exp(log_prob - transitions.log_probs), torch.ones(2))
            # the Gaussian log-density and the KL, each a mean over all C x F' x H' x W' elements (float64)
            action, mean64, std64 = transitions.next_sample.double(), mean.double(), std.double()
            density = -(action - mean64) ** 2 / (2 * std64**2) - std64.log() - 0.5 * math.log(2 * math.pi)
            assert torch.allclose(log_prob.double(), density.reshape(2, -1).mean(dim=1), atol=1e-5)
            shifted = mean + 0.01 * torch.arange(mean.numel()).reshape(mean.shape) / mean.numel()
            expected = ((mean64 - shifted.double()) ** 2 / (2 * std64**2)).reshape(2, -1).mean(dim=1)
            assert torch.allclose(gaussian_kl(mean, shifted, std).double(), expected, rtol=1e-5)


def test_a_trajectory_of_videos_names_the_field_and_both_shapes_when_one_does_not_fit():
    latents = torch.zeros(2, 4, 16, 2, 4, 4)
    steps = torch.zeros(2, 3)
    fields = dict(latents=latents, timesteps=steps, log_probs=steps, policy_steps=steps.bool(), prompts=["a", "b"],
                  prompt_metadata=[{}, {}])
    assert Trajectory(**fields).transitions(torch.tensor([0, 2])).sample.shape == (2, 16, 2, 4, 4)
    with pytest.raises(ValueError, match=r"Trajectory\.log_probs has shape \(2, 4\), expected \(2, 3\) "
                                         r"\(latents \(2, 4, 16, 2, 4, 4\)\)"):
        Trajectory(**{**fields, "log_probs": torch.zeros(2, 4)})


class FrameBrightness:
    """Mean pixel value of each image it is given, remembering what it saw."""

    name = "frame-brightness"

    def __call__(self, images, prompts, metadata):
        self.seen = (tuple(images.shape), list(prompts), list(metadata))
        return images.mean(dim=(1, 2, 3))


def test_a_video_scores_the_mean_of_its_frames_image_rewards():
    videos = torch.rand(2, 3, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    reward = FrameBrightness()
    scores = score(reward, videos, ["cat", "dog"], [{"n": 0}, {"n": 1}])
    expected = [sum(videos[video, :, frame].double().mean() for frame in range(FRAMES)) / FRAMES for video in (0, 1)]
    assert torch.allclose(scores.double(), torch.stack(expected), atol=1e-6)
    assert reward.seen == ((2 * FRAMES, 3, 8, 8), ["cat"] * FRAMES + ["dog"] * FRAMES,
                           [{"n": 0}] * FRAMES + [{"n": 1}] * FRAMES)


def test_grpo_trains_wan_with_lora_writes_videos_and_exports_lora_for_the_vanilla_pipeline(tiny_wan, forked_cli,
                                                                                          tmp_path):
    from diffusers import WanPipeline
    from tensorboard.backend.event_processing import event_accumulator

    result = forked_cli.run("run", "--algo", "grpo", "--model", "wan", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_wan}", "--set", f"model.resolution={SIZE}",
                            "--set", f"model.num_frames={FRAMES}", "--set", "model.lora_rank=4",
                            "--set", f"model.max_sequence_length={TOKENS}", "--set", "algorithm.group_size=4",
                            "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1",
                            "--set", "sample.num_steps=2", "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                            "--set", "eval.num_steps=2", "--epochs", "1", "--logdir", str(tmp_path),
                            "--run-name", "video")
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "video"
    record = json.loads((run_dir / "metrics.jsonl").read_text())
    assert record["policy/ratio_dev_first"] <= 1e-6 and record["train/optimizer_steps"] == 1
    assert record["reward/mean"] < 0 and record["eval/compressibility/mean"] < 0  # a frame's JPEG size, negated
    for gif in (run_dir / "samples" / "epoch_0001.gif", run_dir / "eval" / "epoch_0001.gif"):
        with Image.open(gif) as animation:
            assert animation.n_frames == FRAMES
    with Image.open(run_dir / "samples" / "epoch_0001.png") as strips:  # 4 film strips of 5 frames, 64 px cells
        assert strips.size == (5 * 66 + 2, 4 * 66 + 2)
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    for tag in ("samples/video", "eval/videos"):
        (logged,) = events.Images(tag)
        assert logged.step == 4 and logged.encoded_image_string.startswith(b"GIF89a")

    checkpoint = run_dir / "checkpoints" / "epoch_0001"
    ours = Wan(wan_options(tiny_wan))
    ours.load(torch.device("cpu"), torch.float32)
    ours.configure_training()
    ours.load_weights(checkpoint)
    pipeline = WanPipeline.from_pretrained(tiny_wan)
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 16, 2, 4, 4, generator=generator), timestep=torch.tensor([900.0, 40.0]),
                  encoder_hidden_states=torch.randn(2, TOKENS, 32, generator=generator))
    with torch.no_grad():
        base = pipeline.transformer(**inputs).sample
        pipeline.load_lora_weights(checkpoint / "lora")
        loaded = pipeline.transformer(**inputs).sample
        trained = ours.denoiser(**inputs).sample
    assert not torch.allclose(base, trained, atol=1e-6)  # the update moved the adapters
    assert torch.allclose(loaded, trained, atol=1e-5)  # diffusers' loader reads them as they were trained


def test_a_critic_reads_a_video_state_as_the_mean_of_its_frames_features():
    """TDPO-R's temporal critic on a video model: a state's features are the mean over its decoded frames of the
    per-image features (here the pixel features, each 40-pixel frame area-pooled to the critic's 32)."""
    from ddpo.core.math.critic import CriticFeatures

    class VideoModel:
        def initial_noise(self, count, generator):
            return torch.rand(count, 3, FRAMES, 40, 40, generator=generator)

        def decode(self, states):
            return states  # pixel-space "latents": the videos themselves

    features = CriticFeatures("pixels")
    features.load(VideoModel(), reward=None, device=torch.device("cpu"))
    videos = VideoModel().initial_noise(2, torch.Generator().manual_seed(1))
    pooled = torch.nn.functional.interpolate(videos.transpose(1, 2).flatten(0, 1), size=features.pixel_shape[1:],
                                             mode="area")
    expected = pooled.reshape(2, FRAMES, -1).mean(dim=1)
    assert features.feature_dim == expected.shape[1]
    assert torch.allclose(features(VideoModel(), videos), expected)


def test_ddpo_sample_writes_a_video_models_videos_as_a_gif_and_refuses_one_for_images(tiny_wan, forked_cli, tmp_path):
    result = forked_cli.run("sample", "--model", "wan", "--set", f"model.pretrained={tiny_wan}",
                            "--set", f"model.resolution={SIZE}", "--set", f"model.num_frames={FRAMES}",
                            "--set", f"model.max_sequence_length={TOKENS}", "--set", "sample.num_steps=2",
                            "--num", "2", "--prompt", "a cat", "--out", str(tmp_path / "cats.gif"))
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(tmp_path / "cats.gif") as animation:
        assert animation.n_frames == FRAMES and animation.size == (2 * 66 + 2, 66 + 2)  # 2 videos in a row
    refused = forked_cli.run("sample", "--model", "digits", "--num", "2", "--out", str(tmp_path / "digits.gif"))
    assert refused.returncode == 2 and "a GIF needs a video model" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "digits.gif").exists()
