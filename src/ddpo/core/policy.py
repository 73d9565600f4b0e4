"""DESIGN.md's contract path for policy-gradient helpers, kept importable; the code is `ddpo.core.math.policy`."""

from ddpo.core.math.policy import (ROW, EpochStatistics, PolicyLoss, PolicyStep, ReferenceStep,  # noqa: F401
                                   ReferenceSteps, add_sampled_gradients, clipped_surrogate, gaussian_kl,
                                   kl_to_reference, policy_passes, policy_update, reference_step)
