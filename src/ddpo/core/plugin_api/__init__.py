"""What plugins build on and receive: the base classes (options, rewards, algorithms, prompt sets, models and
the diffusers text-to-image base), the hook specifications, the trajectory schema, and the plugin registry."""
