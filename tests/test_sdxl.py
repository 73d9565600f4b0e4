"""The `sdxl` model plugin on a tiny random StableDiffusionXLPipeline (`ddpo.testing.build_tiny_sdxl`, loaded
through `from_pretrained`): it samples what diffusers' pipeline samples (its two text encoders, zeroed
unconditional embeddings, pooled embeddings and time ids, DDIM from the pipeline's Euler config), its steps are
DDIMScheduler's, its trajectories carry what recomputing a step needs, and the LoRA a `ddpo run` trains loads into
the vanilla pipeline with `load_lora_weights` and samples as ours does."""

import pytest
import torch

from ddpo.core.engine.rollout import sample_batch
from ddpo.plugins.models.sdxl import StableDiffusionXL
from helpers import lora_b_norm

PROMPTS = ["a cat", "a dog"]


def load_sdxl(directory, checkpoint=None):
    model = StableDiffusionXL({"pretrained": str(directory)})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    if checkpoint is not None:
        model.load_weights(checkpoint)
    return model


def deterministic_samples(model, noise, guidance_scale=5.0):
    """Our final latents (B, 4, 16, 16) from `noise` with DDIM at eta 0 (3 steps)."""
    with torch.no_grad():
        trajectory, _ = sample_batch(model, PROMPTS, [{}, {}], num_steps=3, eta=0.0, guidance_scale=guidance_scale,
                                     generator=torch.Generator().manual_seed(0), initial_noise=noise)
    return trajectory.latents[:, -1]


def vanilla_samples(pipeline, noise, guidance_scale=5.0):
    """diffusers' StableDiffusionXLPipeline's final latents from `noise`, with DDIM (eta 0) from its own config."""
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    with torch.no_grad():
        return pipeline(PROMPTS, latents=noise, num_inference_steps=3, guidance_scale=guidance_scale, eta=0.0,
                        height=32, width=32, output_type="latent").images


def test_sdxl_samples_as_the_vanilla_pipeline_and_its_steps_are_ddims(tiny_sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    model = load_sdxl(tiny_sdxl)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = deterministic_samples(model, noise)
    assert torch.allclose(ours, vanilla_samples(pipeline, noise), atol=1e-5)
    assert not torch.allclose(ours, deterministic_samples(model, noise, guidance_scale=1.0), atol=1e-3)

    trajectory, _ = sample_batch(model, PROMPTS, [{}, {}], num_steps=3, eta=1.0, guidance_scale=5.0,
                                 generator=torch.Generator().manual_seed(0))
    conditions = trajectory.prompt_embeds
    assert {key: tuple(value.shape) for key, value in conditions.items()} == {
        "prompt_embeds": (2, 16, 64), "pooled_prompt_embeds": (2, 32), "add_time_ids": (2, 6)}
    assert conditions["add_time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # original size, crop, target
    assert model.negative_embeds["prompt_embeds"].abs().max() == 0  # force_zeros_for_empty_prompt
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(3)
    model.set_timesteps(40)  # recomputing reads the trajectory, not the scheduler's state
    assert trajectory.policy_steps.all()
    with torch.no_grad():
        for step in range(3):
            transitions = trajectory.transitions(torch.full((2,), step))
            log_prob, mean, std, output = model.step_log_prob(transitions, eta=1.0, guidance_scale=5.0)
            assert torch.equal(log_prob, transitions.log_probs)
            noise = (transitions.next_sample - mean) / std
            expected = scheduler.step(output, int(transitions.timesteps[0]), transitions.sample, eta=1.0,
                                      variance_noise=noise).prev_sample
            assert torch.allclose(transitions.next_sample, expected, atol=1e-5)


def test_ddpo_is_on_sdxl_trains_a_lora_the_vanilla_pipeline_loads(tiny_sdxl, forked_cli, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = forked_cli.run("run", "--algo", "ddpo-is", "--model", "sdxl", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sdxl}", "--set", "sample.num_steps=3",
                            "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                            "--set", "train.learning_rate=1e-2", "--epochs", "1",
                            "--logdir", str(tmp_path), "--run-name", "sdxl")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "sdxl" / "checkpoints" / "epoch_0001"
    assert (checkpoint / "lora" / "pytorch_lora_weights.safetensors").is_file()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    trained = deterministic_samples(load_sdxl(tiny_sdxl, checkpoint), noise)
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    base = vanilla_samples(pipeline, noise)
    pipeline.load_lora_weights(checkpoint / "lora")
    assert not torch.allclose(base, trained, atol=1e-4)  # training moved the adapters
    assert torch.allclose(vanilla_samples(pipeline, noise), trained, atol=1e-5)


def test_sdxl_refuses_a_resolution_its_unet_cannot_halve(tiny_sdxl):
    from ddpo.core.configuration.errors import UsageError

    model = StableDiffusionXL({"pretrained": str(tiny_sdxl), "resolution": 30})  # VAE x2, one UNet downsampling
    with pytest.raises(UsageError, match="multiple of 4"):
        model.load(torch.device("cpu"), torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ddpo-sf", "rwr", "dpok", "d3po", "tdpo-r", "grpo"])
def test_every_algorithm_trains_sdxls_lora_for_two_epochs(algorithm, tiny_sdxl, forked_cli, tmp_path):
    """Each algorithm (ddpo-is is the fast test above) runs two epochs of the tiny SDXL with LoRA and its
    checkpoint's adapters have moved from their zero initialisation."""
    extra = {"tdpo-r": ["--set", "algorithm.critic_features=pixels"],
             "grpo": ["--set", "algorithm.group_size=4"]}.get(algorithm, [])
    result = forked_cli.run("run", "--algo", algorithm, "--model", "sdxl", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_sdxl}", "--set", "sample.num_steps=3",
                            "--set", "sample.batch_size=4", "--set", "sample.batches_per_epoch=1",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1", *extra, "--epochs", "2",
                            "--logdir", str(tmp_path), "--run-name", algorithm)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / algorithm / "metrics.jsonl").read_text().splitlines()) == 2
    assert lora_b_norm(tmp_path / algorithm / "checkpoints" / "epoch_0002") > 0
