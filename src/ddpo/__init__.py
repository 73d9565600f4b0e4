"""ddpo: fine-tune diffusion models with reinforcement learning.

The public API for plugin authors. Importing it is cheap: no torch, no model weights.
"""

from importlib.metadata import PackageNotFoundError, version

from ddpo.core.plugin_api.base import Algorithm, Options, PromptSet, Reward
from ddpo.core.plugin_api.hookspecs import hookimpl
from ddpo.core.plugin_api.model import Model

try:
    __version__ = version("ddpo")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["Algorithm", "Model", "Options", "PromptSet", "Reward", "hookimpl", "__version__"]
