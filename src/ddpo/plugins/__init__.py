"""Built-in plugins, registered through the `ddpo` entry-point group like third-party ones."""
