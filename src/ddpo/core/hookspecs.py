"""DESIGN.md's contract path for plugin hooks (§3), kept importable; the code is `ddpo.core.plugin_api.hookspecs`."""

from ddpo.core.plugin_api.hookspecs import (compute_advantages, hookimpl, hookspec, on_checkpoint,  # noqa: F401
                                            on_epoch_end, on_exception, on_rewards, on_rollout_end, on_run_end,
                                            on_run_start, on_update_end, register_algorithms, register_commands,
                                            register_models, register_presets, register_prompts, register_rewards)
