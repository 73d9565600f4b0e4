"""The core, by concern: `plugin_api` (what plugins build on), `engine` (running the training), `math`
(log-probs, samplers, the policy-gradient pass, advantages, critics) and `configuration`. The modules beside them
(`logprob`, `policy`, `hookspecs`, `schema`) are DESIGN.md's contract paths, re-exporting from the subpackages."""
