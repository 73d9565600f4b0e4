"""The core, by concern: `plugin_api` (what plugins build on), `engine` (running the training), `math`
(log-probs, samplers, the policy-gradient pass, advantages, critics) and `configuration`."""
