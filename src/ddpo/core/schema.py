"""DESIGN.md's contract path for trajectories, kept importable; the code is `ddpo.core.plugin_api.schema`."""

from ddpo.core.plugin_api.schema import (SAMPLE, STATE, STEP, Trajectory, Transitions, prompt_embeds_at,  # noqa: F401
                                         stack_transitions)
