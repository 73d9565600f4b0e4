"""Test helpers shipped for plugin authors (and used by ddpo's own tests).

- `build_tiny_sd(directory)` / `build_tiny_sdxl(directory)` / `build_tiny_sd3(directory)` /
  `build_tiny_flux(directory)` / `build_tiny_ddpm(directory)` save tiny random-weight pipelines in diffusers'
  directory layout (tokenizers included), loadable offline through the normal `from_pretrained` path:
  `ddpo run --model sd14 --set model.pretrained=DIR` (or `--model sdxl`, `sd3`, `flux`).
- `build_tiny_wan(directory)` saves a tiny random WanPipeline (Wan2.1 text-to-video, UMT5 encoder included):
  `ddpo run --model wan --set model.pretrained=DIR --set model.resolution=32 --set model.num_frames=5`.
- `build_tiny_clip(directory)`, `build_tiny_llava(directory)`, `build_tiny_owlv2(directory)`,
  `build_tiny_qwen2_vl(directory)` and `build_tiny_text_encoder(directory)` save tiny random CLIP (with
  processor), LLaVA (with processor), OWLv2 detector (with processor), Qwen2-VL (with tokenizer, chat template
  and image processor) and BERT models for offline tests of reward plugins.
- `build_tiny_hps(directory)` saves a random open_clip CLIP as HPSv2.1's checkpoint file (its public key names)
  with a CLIP processor, for the `hps` reward; `build_tiny_imagereward(directory)` a random BLIP checkpoint under
  ImageReward.pt's key names with its med_config.json and a BERT tokenizer, for the `imagereward` reward.
- `check_reward(RewardClass, options)` (answer shape, determinism, options, no torch at import),
  `check_prompt_set(PromptSetClass)` and `check_model(ModelClass, options)`
  exercise a plugin the way the trainer does and raise AssertionError naming what breaks the contract.
"""

from ddpo.testing.builders import (build_tiny_clip, build_tiny_ddpm, build_tiny_flux, build_tiny_hps,
                                   build_tiny_imagereward, build_tiny_llava, build_tiny_owlv2, build_tiny_qwen2_vl,
                                   build_tiny_sd, build_tiny_sd3, build_tiny_sdxl, build_tiny_text_encoder,
                                   build_tiny_wan)
from ddpo.testing.contracts import check_model, check_prompt_set, check_reward

__all__ = ["build_tiny_clip", "build_tiny_ddpm", "build_tiny_flux", "build_tiny_hps", "build_tiny_imagereward",
           "build_tiny_llava", "build_tiny_owlv2", "build_tiny_qwen2_vl", "build_tiny_sd", "build_tiny_sd3",
           "build_tiny_sdxl", "build_tiny_text_encoder", "build_tiny_wan", "check_model", "check_prompt_set",
           "check_reward"]
