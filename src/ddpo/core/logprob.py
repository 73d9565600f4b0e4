"""DESIGN.md's contract path for the log-prob steps (§7), kept importable; the code is `ddpo.core.math.logprob`."""

from ddpo.core.math.logprob import (ddim_previous_timestep, ddim_step_with_logprob,  # noqa: F401
                                    ddpm_previous_timestep, ddpm_step_with_logprob, flow_sde_step_with_logprob,
                                    dance_grpo_step_with_logprob, cps_step_with_logprob)
