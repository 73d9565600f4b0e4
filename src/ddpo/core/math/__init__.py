"""The math the algorithms share: stochastic sampler steps with log-probabilities, the policy-gradient pass,
advantages, critics and their neuron resets."""
