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


def _character_clip_tokenizer(model_max_length: int, extra_special_tokens: tuple[str, ...] = ()):
    """A CLIPTokenizer over printable ASCII characters, built locally (no download)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        vocab_path, merges_path = _write_character_vocab(Path(scratch))
        tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=model_max_length)
    if extra_special_tokens:
        tokenizer.add_tokens(list(extra_special_tokens), special_tokens=True)
    return tokenizer


def _write_clip_image_processor_config(directory: Path, image_size: int) -> None:
    """A CLIP image-processor config (OpenAI's mean/std, bicubic resize of the shortest side, centre crop) at
    `image_size`; `AutoImageProcessor` loads it with whichever backend is installed."""
    config = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
              "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "do_convert_rgb": True}
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2))


def _tiny_clip_vision_config(image_size: int) -> dict:
    return dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4)


def build_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 768) -> Path:
    """Save a random `CLIPModel` (about 0.1M parameters plus the projections) with its processor (tokenizer and
    image-processor config) to `directory`, in the layout of a hub CLIP repository.

    `CLIPModel.from_pretrained`, `CLIPVisionModelWithProjection.from_pretrained`, `AutoTokenizer` and
    `AutoImageProcessor` load it offline. The projection is 768-wide like ViT-L/14's, so the LAION aesthetic
    MLP fits on top of it.
    """
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _character_clip_tokenizer(model_max_length=77)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77,
                       bos_token_id=tokenizer.convert_tokens_to_ids(START),
                       eos_token_id=tokenizer.convert_tokens_to_ids(END),
                       pad_token_id=tokenizer.convert_tokens_to_ids(END), projection_dim=projection_dim)
    vision_config = dict(_tiny_clip_vision_config(image_size), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    _write_clip_image_processor_config(directory, image_size)
    return directory


LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
"""A chat template giving LLaVA-1.5's conversation format ("USER: <image>\n{question} ASSISTANT:")."""


def build_tiny_llava(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random `LlavaForConditionalGeneration` (a tiny CLIP vision tower and a tiny Llama) with a
    `LlavaProcessor` (character tokenizer with an `<image>` token) to `directory`, loadable offline by
    `LlavaForConditionalGeneration.from_pretrained` and `AutoProcessor.from_pretrained`. It generates
    gibberish, deterministically."""
    from transformers import AutoImageProcessor, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, \
        LlavaProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _character_clip_tokenizer(model_max_length=512, extra_special_tokens=("<image>",))
    _write_clip_image_processor_config(directory, image_size)
    image_processor = AutoImageProcessor.from_pretrained(directory)
    end = tokenizer.convert_tokens_to_ids(END)
    text_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                              bos_token_id=tokenizer.convert_tokens_to_ids(START), eos_token_id=end,
                              pad_token_id=end)
    config = LlavaConfig(vision_config=dict(model_type="clip_vision_model", **_tiny_clip_vision_config(image_size)),
                         text_config=text_config, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = end
    model.generation_config.eos_token_id = end
    model.save_pretrained(directory, safe_serialization=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_15_CHAT_TEMPLATE)
    processor.save_pretrained(directory)
    return directory


def build_tiny_text_encoder(directory: str | Path, seed: int = 0) -> Path:
    """Save a random 3-layer `BertModel` with a character tokenizer to `directory` (AutoModel/AutoTokenizer load
    it offline): a stand-in for BERTScore's encoder."""
    from transformers import BertConfig, BertModel

    directory = Path(directory)
    tokenizer = _character_clip_tokenizer(model_max_length=128)
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                 num_attention_heads=4, max_position_embeddings=128,
                                 pad_token_id=tokenizer.convert_tokens_to_ids(END)))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def _character_t5_tokenizer(directory: Path):
    """A T5 tokenizer over printable ASCII characters (a `tokenizers` Unigram model, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(code), -1.0) for code in range(33, 127)]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    tokenizer.save_pretrained(directory)
    return T5TokenizerFast.from_pretrained(directory)


def build_tiny_sd3(directory: str | Path, seed: int = 0, image_size: int = 32, with_t5: bool = True) -> Path:
    """Save a StableDiffusion3Pipeline with random weights to `directory` (the hub layout of SD3/3.5: transformer,
    vae, two CLIP text encoders with projection, optionally a T5 encoder, their tokenizers, and a
    FlowMatchEulerDiscreteScheduler with shift 3). Images are `image_size` pixels, latents 4 x image_size/2."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path, merges_path = _write_character_vocab(Path(scratch))
        tokenizer = CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=16)
        t5_tokenizer = _character_t5_tokenizer(Path(scratch) / "t5") if with_t5 else None
    torch.manual_seed(seed)

    def clip_encoder():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
            bos_token_id=tokenizer.convert_tokens_to_ids(START), eos_token_id=tokenizer.convert_tokens_to_ids(END),
            pad_token_id=tokenizer.convert_tokens_to_ids(END)))

    text_encoder, text_encoder_2 = clip_encoder(), clip_encoder()
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id)) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=image_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def _tiny_vae(image_size: int, latent_channels: int, **config):
    """A two-level AutoencoderKL (factor 2) with random weights; `config`: scaling, shift, quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=latent_channels,
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=image_size, **config)


def _tiny_clip_text_encoder(tokenizer, with_projection: bool):
    """A two-layer CLIP text encoder (width 32) over `tokenizer`'s vocabulary, with a 32-wide projection or not."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(START), eos_token_id=tokenizer.convert_tokens_to_ids(END),
        pad_token_id=tokenizer.convert_tokens_to_ids(END))
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def build_tiny_sdxl(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a StableDiffusionXLPipeline with random weights to `directory` (the hub layout of SDXL base: unet, vae,
    text_encoder (CLIP) and text_encoder_2 (CLIP with projection) with their tokenizers, and SDXL base's Euler
    scheduler config). The UNet has SDXL's `addition_embed_type="text_time"`: it reads the pooled projection (32)
    and six time ids (8 channels each). Images are `image_size` pixels, latents 4 x image_size/2 x image_size/2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    directory = Path(directory)
    tokenizer = _character_clip_tokenizer(model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = _tiny_clip_text_encoder(tokenizer, with_projection=False)
    text_encoder_2 = _tiny_clip_text_encoder(tokenizer, with_projection=True)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim)
    # SDXL base's scheduler config (an Euler scheduler on SD's betas), which the model plugin turns into DDIM
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(image_size, 4, scaling_factor=0.13025), text_encoder=text_encoder,
        text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)
    # the hub file also holds DDIM's settings, which DDIMScheduler.from_config reads (its defaults differ)
    config_path = directory / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(clip_sample=False, set_alpha_to_one=False, sample_max_value=1.0, skip_prk_steps=True)
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def build_tiny_flux(directory: str | Path, seed: int = 0, image_size: int = 32, schnell: bool = False) -> Path:
    """Save a FluxPipeline with random weights to `directory` (the hub layout of FLUX.1: transformer, vae,
    text_encoder (CLIP, its pooled output) and text_encoder_2 (T5) with their tokenizers, and a scheduler config).
    The transformer has one double- and one single-stream block. FLUX.1-dev's layout by default: a guidance
    embedding and the schedule shifted by the image sequence length (dynamic shifting); `schnell`: neither (no
    guidance input, shift 1). Images are `image_size` pixels, latents 4 x image_size/2 x image_size/2, packed as
    (image_size/4)^2 tokens of 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    directory = Path(directory)
    tokenizer = _character_clip_tokenizer(model_max_length=16)
    with tempfile.TemporaryDirectory() as scratch:
        t5_tokenizer = _character_t5_tokenizer(Path(scratch))
    torch.manual_seed(seed)
    text_encoder = _tiny_clip_text_encoder(tokenizer, with_projection=False)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id))
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=latent_channels * 4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=not schnell,
        axes_dims_rope=(4, 2, 2))
    scheduler = (FlowMatchEulerDiscreteScheduler(shift=1.0) if schnell else FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096))
    pipeline = FluxPipeline(
        scheduler=scheduler, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer,
        vae=_tiny_vae(image_size, latent_channels, use_quant_conv=False, use_post_quant_conv=False,
                      shift_factor=0.1159, scaling_factor=0.3611))
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_tiny_owlv2(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random `Owlv2ForObjectDetection` (about 50k parameters, 8-pixel patches: (image_size / 8)^2 boxes per
    image) with its `Owlv2Processor` (character tokenizer, image processor at `image_size`) to `directory`, loadable
    offline by their `from_pretrained`."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    directory = Path(directory)
    tokenizer = _character_clip_tokenizer(model_max_length=16)  # OWLv2's text context, as the hub checkpoints'
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=16,
                       bos_token_id=tokenizer.convert_tokens_to_ids(START),
                       eos_token_id=tokenizer.convert_tokens_to_ids(END),
                       pad_token_id=tokenizer.convert_tokens_to_ids(END))
    torch.manual_seed(seed)
    config = Owlv2Config(text_config=text_config, vision_config=_tiny_clip_vision_config(image_size), projection_dim=32)
    model = Owlv2ForObjectDetection(config)
    model.save_pretrained(directory, safe_serialization=True)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


QWEN2_VL_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                           "<|image_pad|>", "<|video_pad|>")
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2-VL-Instruct's conversation format: a default system turn, `<|im_start|>ROLE\\n...<|im_end|>\\n` turns, an
image as `<|vision_start|><|image_pad|><|vision_end|>`, and `<|im_start|>assistant\\n` opening the answer."""


def _byte_level_qwen2_tokenizer(words: tuple[str, ...]):
    """A Qwen2 byte-level BPE tokenizer whose vocabulary is the 256 byte symbols, Qwen2-VL's special tokens and
    `words` (each also with a leading space) as single tokens, built locally (no download)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    tokens = sorted(ByteLevel.alphabet())
    merges = []
    for word in words:
        merged = word[0]
        for character in word[1:]:
            merges.append(f"{merged} {character}")
            merged += character
            tokens.append(merged)
        merges.append(f"Ġ {word}")  # "Ġ" is the byte-level symbol of a space
        tokens.append("Ġ" + word)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_path, merges_path = Path(scratch) / "vocab.json", Path(scratch) / "merges.txt"
        vocab_path.write_text(json.dumps({token: index for index, token in enumerate(dict.fromkeys(tokens))}))
        merges_path.write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        tokenizer = Qwen2Tokenizer(str(vocab_path), str(merges_path), model_max_length=4096)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS)})
    return tokenizer


def build_tiny_qwen2_vl(directory: str | Path, seed: int = 0, words: tuple[str, ...] = ("Yes", "yes", "No", "no"),
                        patch_size: int = 4) -> Path:
    """Save a random `Qwen2VLForConditionalGeneration` (a one-block vision tower and a two-layer decoder, about
    40k parameters), its tokenizer (byte-level BPE holding `words` as single tokens, with Qwen2-VL's chat
    template) and its image-processor config (`patch_size`-pixel patches merged 2x2) to `directory`, loadable
    offline by `AutoModelForImageTextToText`, `AutoTokenizer` and `AutoImageProcessor`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _byte_level_qwen2_tokenizer(words)
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "patch_size": patch_size, "merge_size": 2,
        "temporal_patch_size": 2, "min_pixels": (2 * patch_size) ** 2, "max_pixels": 64 * (2 * patch_size) ** 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                       bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                       pad_token_id=ids["<|endoftext|>"])
    vision_config = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=patch_size,
                         spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text_config, vision_config=vision_config,
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(directory, safe_serialization=True)
    return directory


def _random_tensor(generator: torch.Generator, *shape: int, scale: float | None = None) -> torch.Tensor:
    """Normal noise of `shape`, scaled by 1/sqrt(fan-in) (the last dimension) unless `scale` is given."""
    scale = shape[-1] ** -0.5 if scale is None else scale
    return torch.randn(*shape, generator=generator) * scale


def _random_layer_norm(generator: torch.Generator, prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1 + _random_tensor(generator, width, scale=0.1),
            f"{prefix}.bias": _random_tensor(generator, width, scale=0.1)}


def _random_linear(generator: torch.Generator, prefix: str, out_features: int, in_features: int,
                   bias: bool = True) -> dict[str, torch.Tensor]:
    state = {f"{prefix}.weight": _random_tensor(generator, out_features, in_features)}
    if bias:
        state[f"{prefix}.bias"] = _random_tensor(generator, out_features, scale=0.1)
    return state


def _open_clip_resblocks(generator: torch.Generator, prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    """open_clip `Transformer` residual blocks: fused attention input projection, 4x MLP."""
    state = {}
    for index in range(layers):
        block = f"{prefix}.resblocks.{index}"
        state.update(_random_layer_norm(generator, f"{block}.ln_1", width))
        state[f"{block}.attn.in_proj_weight"] = _random_tensor(generator, 3 * width, width)
        state[f"{block}.attn.in_proj_bias"] = _random_tensor(generator, 3 * width, scale=0.1)
        state.update(_random_linear(generator, f"{block}.attn.out_proj", width, width))
        state.update(_random_layer_norm(generator, f"{block}.ln_2", width))
        state.update(_random_linear(generator, f"{block}.mlp.c_fc", 4 * width, width))
        state.update(_random_linear(generator, f"{block}.mlp.c_proj", width, 4 * width))
    return state


def build_tiny_hps(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random open_clip ViT CLIP as HPSv2.1's checkpoint file `HPS_v2.1_compressed.pt` ({"state_dict": ...}
    under open_clip's key names: `visual.transformer.resblocks.N.attn.in_proj_weight`, `text_projection`, ...) with a
    CLIP processor (character tokenizer, image-processor config at `image_size`) to `directory`, for the `hps`
    reward: `--set reward.pretrained=DIR --set reward.processor=DIR`. Vision width 160 (two heads of ViT-H-14's
    head width 80), 8-pixel patches; text width 128 (two heads of 64), 77 tokens; 2 layers each; embeddings 32-d."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = _character_clip_tokenizer(model_max_length=77)
    tokenizer.save_pretrained(directory)
    _write_clip_image_processor_config(directory, image_size)
    generator = torch.Generator().manual_seed(seed)
    vision_width, text_width, patch_size, embed_dim, layers = 160, 128, 8, 32, 2
    state = {"visual.class_embedding": _random_tensor(generator, vision_width),
             "visual.positional_embedding": _random_tensor(generator, (image_size // patch_size) ** 2 + 1,
                                                           vision_width),
             "visual.conv1.weight": _random_tensor(generator, vision_width, 3, patch_size, patch_size,
                                                   scale=(3 * patch_size ** 2) ** -0.5)}
    state.update(_random_layer_norm(generator, "visual.ln_pre", vision_width))
    state.update(_open_clip_resblocks(generator, "visual.transformer", vision_width, layers))
    state.update(_random_layer_norm(generator, "visual.ln_post", vision_width))
    state["visual.proj"] = _random_tensor(generator, vision_width, embed_dim, scale=vision_width ** -0.5)
    state["token_embedding.weight"] = _random_tensor(generator, len(tokenizer), text_width, scale=0.5)
    state["positional_embedding"] = _random_tensor(generator, 77, text_width, scale=0.1)
    state.update(_open_clip_resblocks(generator, "transformer", text_width, layers))
    state.update(_random_layer_norm(generator, "ln_final", text_width))
    state["text_projection"] = _random_tensor(generator, text_width, embed_dim, scale=text_width ** -0.5)
    state["logit_scale"] = torch.tensor(4.6052)
    torch.save({"state_dict": state}, directory / "HPS_v2.1_compressed.pt")
    return directory


def _character_bert_tokenizer(directory: Path):
    """A BERT WordPiece tokenizer over lower-case ASCII characters ([PAD] 0, [UNK], [CLS], [SEP], [MASK], each
    character alone and as a `##` continuation), saved to `directory` and loaded back."""
    from transformers import BertTokenizer

    characters = [chr(code) for code in range(33, 127) if not chr(code).isupper()]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters + ["##" + c for c in characters]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertTokenizer(str(directory / "vocab.txt"), do_lower_case=True, model_max_length=512).save_pretrained(directory)
    return BertTokenizer.from_pretrained(directory)


def _bert_attention(generator: torch.Generator, prefix: str, width: int, key_width: int) -> dict[str, torch.Tensor]:
    state = {}
    for name, in_features in (("query", width), ("key", key_width), ("value", key_width)):
        state.update(_random_linear(generator, f"{prefix}.self.{name}", width, in_features))
    state.update(_random_linear(generator, f"{prefix}.output.dense", width, width))
    state.update(_random_layer_norm(generator, f"{prefix}.output.LayerNorm", width))
    return state


def build_tiny_imagereward(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random ImageReward checkpoint `ImageReward.pt` under the public key names (`blip.visual_encoder.*`
    as BLIP's timm-style ViT, `blip.text_encoder.*` as BLIP's BERT with cross-attention, `blip.vision_proj`,
    `blip.text_proj`, `mlp.layers.{0,2,4,6,7}`), its `med_config.json` and a character BERT tokenizer to
    `directory`, for the `imagereward` reward: `--set reward.pretrained=DIR --set reward.tokenizer=DIR`. ViT width
    128 (two heads of 64), 8-pixel patches; text width 64 (two heads), 2 layers each; the MLP 64 -> 1024 -> 128 ->
    64 -> 16 -> 1."""
    directory = Path(directory)
    tokenizer = _character_bert_tokenizer(directory)
    vision_width, text_width, patch_size, layers, max_positions = 128, 64, 8, 2, 64
    vocab_size = len(tokenizer) + 2  # BLIP adds [DEC] and [ENC]
    med_config = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.1, "hidden_size": text_width, "initializer_range": 0.02,
                  "intermediate_size": 2 * text_width, "layer_norm_eps": 1e-12,
                  "max_position_embeddings": max_positions, "model_type": "bert", "num_attention_heads": 2,
                  "num_hidden_layers": layers, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size,
                  "encoder_width": vision_width, "add_cross_attention": True}
    (directory / "med_config.json").write_text(json.dumps(med_config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    state = {f"{vit}.cls_token": _random_tensor(generator, 1, 1, vision_width, scale=0.5),
             f"{vit}.pos_embed": _random_tensor(generator, 1, (image_size // patch_size) ** 2 + 1, vision_width,
                                                scale=0.5)}
    state.update(_random_linear(generator, f"{vit}.patch_embed.proj", vision_width, 3 * patch_size ** 2))
    state[f"{vit}.patch_embed.proj.weight"] = state[f"{vit}.patch_embed.proj.weight"].reshape(
        vision_width, 3, patch_size, patch_size)
    for index in range(layers):
        block = f"{vit}.blocks.{index}"
        state.update(_random_layer_norm(generator, f"{block}.norm1", vision_width))
        state.update(_random_linear(generator, f"{block}.attn.qkv", 3 * vision_width, vision_width))
        state.update(_random_linear(generator, f"{block}.attn.proj", vision_width, vision_width))
        state.update(_random_layer_norm(generator, f"{block}.norm2", vision_width))
        state.update(_random_linear(generator, f"{block}.mlp.fc1", 4 * vision_width, vision_width))
        state.update(_random_linear(generator, f"{block}.mlp.fc2", vision_width, 4 * vision_width))
    state.update(_random_layer_norm(generator, f"{vit}.norm", vision_width))
    state[f"{bert}.embeddings.position_ids"] = torch.arange(max_positions).expand(1, -1)
    state[f"{bert}.embeddings.word_embeddings.weight"] = _random_tensor(generator, vocab_size, text_width, scale=1.0)
    state[f"{bert}.embeddings.position_embeddings.weight"] = _random_tensor(generator, max_positions, text_width,
                                                                            scale=0.3)
    state.update(_random_layer_norm(generator, f"{bert}.embeddings.LayerNorm", text_width))
    for index in range(layers):
        layer = f"{bert}.encoder.layer.{index}"
        state.update(_bert_attention(generator, f"{layer}.attention", text_width, text_width))
        state.update(_bert_attention(generator, f"{layer}.crossattention", text_width, vision_width))
        state.update(_random_linear(generator, f"{layer}.intermediate.dense", 2 * text_width, text_width))
        state.update(_random_linear(generator, f"{layer}.output.dense", text_width, 2 * text_width))
        state.update(_random_layer_norm(generator, f"{layer}.output.LayerNorm", text_width))
    state.update(_random_linear(generator, "blip.vision_proj", 256, vision_width))
    state.update(_random_linear(generator, "blip.text_proj", 256, text_width))
    for index, (out_features, in_features) in zip((0, 2, 4, 6, 7), ((1024, text_width), (128, 1024), (64, 128),
                                                                    (16, 64), (1, 16))):
        state.update(_random_linear(generator, f"mlp.layers.{index}", out_features, in_features))
    torch.save(state, directory / "ImageReward.pt")


def build_tiny_wan(directory: str | Path, seed: int = 0) -> Path:
    """Save a WanPipeline (Wan2.1 text-to-video) with random weights to `directory`, in the hub layout of
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers: a one-layer WanTransformer3DModel, an AutoencoderKLWan (8x spatial, 4x
    temporal compression, 16 latent channels, the hub's latent mean and std), a tiny UMT5 text encoder with a
    character T5 tokenizer, and the hub's scheduler (UniPCMultistepScheduler on flow sigmas, flow_shift 3).
    A video of F frames at H x W pixels has latents 16 x ((F - 1) / 4 + 1) x H/8 x W/8; frames must be multiples
    of 16 pixels (8 x the transformer's 2x2 patches)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _character_t5_tokenizer(Path(scratch) / "t5")
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                           scheduler=scheduler)
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
