"""Configuration: the run config and how its layers merge, presets, the checks before a run loads anything,
the run directory's names, and the errors a user can cause."""
