"""The training engine: the run, the trainer's epoch loop, rollouts, checkpoints, guards, the optimizer and
its accumulation, scale-out, performance options, evaluation, logging, and `ddpo sample`."""
