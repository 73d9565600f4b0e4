"""Algorithm plugins, one paper per file."""
