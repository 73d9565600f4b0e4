"""The engine: schema, hooks, plugin manager, config, log-probs, rollout, advantages, trainer, logging."""
