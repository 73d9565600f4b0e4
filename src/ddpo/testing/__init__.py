"""Test helpers shipped for plugin authors (and used by ddpo's own tests).

- `build_tiny_sd(directory)` / `build_tiny_ddpm(directory)` save tiny random-weight pipelines in diffusers'
  directory layout (tokenizer included), loadable offline through the normal `from_pretrained` path:
  `ddpo run --model sd14 --set model.pretrained=DIR`.
- `check_reward(RewardClass)`, `check_prompt_set(PromptSetClass)` and `check_model(ModelClass, options)`
  exercise a plugin the way the trainer does and raise AssertionError naming what breaks the contract.
"""

from ddpo.testing.builders import build_tiny_ddpm, build_tiny_sd
from ddpo.testing.contracts import check_model, check_prompt_set, check_reward

__all__ = ["build_tiny_ddpm", "build_tiny_sd", "check_model", "check_prompt_set", "check_reward"]
