"""The `flux` model plugin on a tiny random FluxPipeline (`ddpo.testing.build_tiny_flux`, loaded through
`from_pretrained`): its packing is diffusers', it samples what diffusers' pipeline samples (FluxPipeline's sigmas
shifted by mu, the guidance embedding, T5 and pooled CLIP embeddings, latent image ids) with the flow SDE at noise
level 0, its trajectories recompute to ratio one, and the LoRA a `ddpo run --algo grpo` trains loads into the
vanilla pipeline with `load_lora_weights` and samples as ours does."""

import pytest
import torch

from ddpo.core.engine.rollout import sample_batch
from ddpo.plugins.models.flux import Flux, latent_image_ids, pack_latents, unpack_latents
from helpers import lora_b_norm

PROMPTS = ["a cat", "a dog"]
OPTIONS = {"resolution": 32, "max_sequence_length": 16, "lora_rank": 4}


def load_flux(directory, checkpoint=None):
    model = Flux({"pretrained": str(directory), **OPTIONS})
    model.load(torch.device("cpu"), torch.float32)
    model.configure_training()
    if checkpoint is not None:
        model.load_weights(checkpoint)
    return model


def deterministic_samples(model, noise, guidance_scale=3.5):
    """Our final latents (B, 4, 16, 16) from `noise` with the flow SDE at noise level 0 (3 Euler steps)."""
    with torch.no_grad():
        trajectory, _ = sample_batch(model, PROMPTS, [{}, {}], num_steps=3, eta=0.0, guidance_scale=guidance_scale,
                                     generator=torch.Generator().manual_seed(0), initial_noise=noise)
    return trajectory.latents[:, -1]


def vanilla_samples(pipeline, noise, guidance_scale=3.5):
    """diffusers' FluxPipeline's final latents from `noise` (packed for it, unpacked from it)."""
    with torch.no_grad():
        packed = pipeline(PROMPTS, latents=pack_latents(noise), num_inference_steps=3, guidance_scale=guidance_scale,
                          height=32, width=32, max_sequence_length=16, output_type="latent").images
    return unpack_latents(packed, 16, 16)


def test_flux_packs_latents_and_numbers_patches_as_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(latent_image_ids(6, 8, "cpu"), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu",
                                                                                             torch.float32))


def test_flux_samples_as_the_vanilla_pipeline_and_recomputes_to_ratio_one(tiny_flux):
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    model = load_flux(tiny_flux)
    assert model.sampler.mu == calculate_shift(64)  # 16x16 latents, 8x8 patches
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = deterministic_samples(model, noise)
    assert torch.allclose(ours, vanilla_samples(pipeline, noise), atol=1e-5)
    assert not torch.allclose(ours, deterministic_samples(model, noise, guidance_scale=1.0), atol=1e-3)

    trajectory, _ = sample_batch(model, PROMPTS, [{}, {}], num_steps=3, eta=0.7, guidance_scale=3.5,
                                 generator=torch.Generator().manual_seed(0))
    assert {key: tuple(value.shape) for key, value in trajectory.prompt_embeds.items()} == {
        "prompt_embeds": (2, 16, 32), "pooled_prompt_embeds": (2, 32)}
    assert trajectory.latents.shape == (2, 4, 4, 16, 16) and trajectory.policy_steps.all()
    model.set_timesteps(28)  # recomputing reads the trajectory, not the scheduler's state
    with torch.no_grad():
        for step in range(3):
            transitions = trajectory.transitions(torch.full((2,), step))
            log_prob, *_ = model.step_log_prob(transitions, eta=0.7, guidance_scale=3.5)
            assert torch.equal(log_prob, transitions.log_probs)


def test_flux_schnell_has_no_guidance_input_nor_shift_and_samples_as_the_vanilla_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from ddpo.testing import build_tiny_flux

    directory = build_tiny_flux(tmp_path / "schnell", schnell=True)
    model = load_flux(directory)
    assert model.sampler.mu is None
    assert model.set_timesteps(4)[0].tolist() == [1000, 750, 500, 250]  # linspace(1, 1/n, n), unshifted
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = deterministic_samples(model, noise)
    assert torch.equal(ours, deterministic_samples(model, noise, guidance_scale=1.0))
    assert torch.allclose(ours, vanilla_samples(FluxPipeline.from_pretrained(directory), noise), atol=1e-5)


def test_grpo_on_flux_trains_a_lora_the_vanilla_pipeline_loads(tiny_flux, forked_cli, tmp_path):
    from diffusers import FluxPipeline

    result = forked_cli.run("run", "--algo", "grpo", "--model", "flux", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_flux}", "--set", "model.resolution=32",
                            "--set", "model.max_sequence_length=16", "--set", "model.lora_rank=4",
                            "--set", "algorithm.group_size=4", "--set", "sample.batch_size=4",
                            "--set", "sample.batches_per_epoch=1", "--set", "sample.num_steps=3",
                            "--set", "train.batch_size=4", "--set", "train.grad_accum=1",
                            "--set", "train.learning_rate=1e-2", "--set", "eval.num_steps=2", "--epochs", "1",
                            "--logdir", str(tmp_path), "--run-name", "flux")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "flux" / "checkpoints" / "epoch_0001"
    assert (checkpoint / "lora" / "pytorch_lora_weights.safetensors").is_file()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    trained = deterministic_samples(load_flux(tiny_flux, checkpoint), noise)
    pipeline = FluxPipeline.from_pretrained(tiny_flux)
    base = vanilla_samples(pipeline, noise)
    pipeline.load_lora_weights(checkpoint / "lora")
    assert not torch.allclose(base, trained, atol=1e-4)  # training moved the adapters
    assert torch.allclose(vanilla_samples(pipeline, noise), trained, atol=1e-5)  # alpha / rank included


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ddpo-is", "rwr", "dpok", "d3po", "tdpo-r"])
def test_other_algorithms_train_fluxs_lora_for_two_epochs(algorithm, tiny_flux, forked_cli, tmp_path):
    """Algorithms other than grpo (the fast test above) on the flow SDE, with FLUX's guidance embedding in place of
    guidance: two epochs of the tiny FLUX with LoRA, and the checkpoint's adapters have moved from zero."""
    extra = ["--set", "algorithm.critic_features=pixels"] if algorithm == "tdpo-r" else []
    result = forked_cli.run("run", "--algo", algorithm, "--model", "flux", "--reward", "compressibility",
                            "--set", f"model.pretrained={tiny_flux}", "--set", "model.resolution=32",
                            "--set", "model.max_sequence_length=16", "--set", "model.lora_rank=4",
                            "--set", "sample.num_steps=3", "--set", "sample.batch_size=4",
                            "--set", "sample.batches_per_epoch=1", "--set", "train.batch_size=4",
                            "--set", "train.grad_accum=1", "--set", "eval.num_steps=2", *extra, "--epochs", "2",
                            "--logdir", str(tmp_path), "--run-name", algorithm)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len((tmp_path / algorithm / "metrics.jsonl").read_text().splitlines()) == 2
    assert lora_b_norm(tmp_path / algorithm / "checkpoints" / "epoch_0002") > 0
