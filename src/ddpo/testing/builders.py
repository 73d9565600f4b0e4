"""Tiny random-weight diffusers pipelines saved to disk, for offline tests of the real loading code."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

START, END = "<|startoftext|>", "<|endoftext|>"


def _write_character_vocab(directory: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of printable ASCII characters (with and without the end-of-word mark), no merges."""
    characters = [chr(code) for code in range(33, 127)]
    tokens = characters + [character + "</w>" for character in characters] + [START, END]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({token: index for index, token in enumerate(tokens)}))
    merges_path.write_text("#version: 0.2\n")
    return vocab_path, merges_path


def build_tiny_sd(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a StableDiffusionPipeline with random weights (about 1M parameters) to `directory`.

    Same layout as a hub SD 1.x repository (unet, vae, text_encoder, tokenizer, scheduler with SD's DDIM
    settings); images are `image_size` pixels, latents 4 x image_size/2 x image_size/2.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path, merges_path = _write_character_vocab(Path(scratch))
        tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=16)
    vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=tokenizer.convert_tokens_to_ids(START),
        eos_token_id=tokenizer.convert_tokens_to_ids(END), pad_token_id=tokenizer.convert_tokens_to_ids(END)))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=image_size)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_ddpm(directory: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """Save a DDPMPipeline with a random UNet2DModel (3 channels, `image_size` pixels, one attention block)
    and google/ddpm-style scheduler settings (1000 linear betas, clip_sample) to `directory`."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory, safe_serialization=True)
    return Path(directory)
