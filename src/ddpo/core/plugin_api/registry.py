"""The plugin manager: entry-point discovery, and the registry of algorithms, rewards, models and prompt sets
(and of presets, `ddpo.core.configuration.presets`).

Built-ins are entry points of the `ddpo` distribution itself, so they are found the same way as third-party
plugins. `DDPO_LOAD_PLUGINS=a,b` loads only the third-party entry points named a and b (empty: none);
built-ins always load. A plugin that fails to import is reported by name and skipped.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from ddpo.core.configuration.errors import unknown_name_error
from ddpo.core.configuration.presets import Preset, make_register
from ddpo.core.plugin_api import hookspecs
from ddpo.core.plugin_api.base import Algorithm, Plugin, PromptSet, Reward
from ddpo.core.plugin_api.model import Model

GROUP = "ddpo"
KINDS = ("algorithms", "rewards", "models", "prompts")
_load_failures: dict[str, str] = {}
_entry_point_distributions: dict[str, tuple[str, str]] = {}
"""(distribution name, version) by the top-level package of each loaded entry point."""


@dataclass
class PluginInfo:
    """A registered plugin class and where it comes from."""

    name: str
    kind: str
    cls: type[Plugin]
    package: str
    version: str

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "description": self.cls.description(),
            "options": self.options(),
        }

    def options(self) -> list[dict[str, str]]:
        """The plugin's options: name, type, default and help text (the field's docstring)."""
        fields = self.cls.Options.model_fields
        return [{"name": name, "type": _type_name(field.annotation), "default": repr(field.default),
                 "help": field.description or ""} for name, field in fields.items()]


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


@dataclass
class Registry:
    """Every registered plugin class by kind and name, and the entry points that failed to load."""

    plugins: dict[str, dict[str, PluginInfo]] = field(default_factory=lambda: {kind: {} for kind in KINDS})
    failures: dict[str, str] = field(default_factory=dict)
    presets: dict[str, Preset] = field(default_factory=dict)

    def get(self, kind: str, name: str) -> type[Plugin]:
        """The class registered as `name`, or a UsageError listing the valid names."""
        try:
            return self.plugins[kind][name].cls
        except KeyError:
            raise unknown_name_error(kind.rstrip("s") if kind != "prompts" else "prompt set", name,
                                     self.plugins[kind]) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.plugins[kind])


def _distribution_of(module_name: str) -> tuple[str, str]:
    """(distribution name, version) of the package that holds `module_name`: known from the entry point that
    loaded it; otherwise looked up once in every installed distribution's file list (slow: seconds)."""
    top = module_name.split(".")[0]
    if top in _entry_point_distributions:
        return _entry_point_distributions[top]
    dists = _packages_distributions().get(top, [])
    if not dists:
        return top, "unknown"
    return dists[0], metadata.version(dists[0])


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _make_register(registry: Registry, kind: str, base: type):
    def register(cls: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"register_{kind} expects a subclass of ddpo.{base.__name__}, got {cls!r}")
        if not cls.name:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no `name`")
        package, version = _distribution_of(cls.__module__)
        registry.plugins[kind][cls.name] = PluginInfo(cls.name, kind, cls, package, version)

    return register


@functools.cache
def _name_and_version(dist: metadata.Distribution) -> tuple[str, str]:
    """A distribution's name and version; each read parses its METADATA file, so once per distribution."""
    return dist.name, dist.version


def _entry_points() -> list[metadata.EntryPoint]:
    """The `ddpo` entry points to load: all built-ins, and the third-party ones DDPO_LOAD_PLUGINS allows."""
    allowed = os.environ.get("DDPO_LOAD_PLUGINS")
    allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    chosen = []
    for entry_point in metadata.entry_points(group=GROUP):
        builtin = entry_point.dist is not None and _name_and_version(entry_point.dist)[0] == "ddpo"
        if builtin or allowed_names is None or entry_point.name in allowed_names:
            chosen.append(entry_point)
    return chosen


@functools.cache
def get_plugin_manager() -> pluggy.PluginManager:
    """The one plugin manager of the process, with every loadable `ddpo` entry point registered."""
    manager = pluggy.PluginManager(GROUP)
    manager.add_hookspecs(hookspecs)
    for entry_point in _entry_points():
        if manager.get_plugin(entry_point.name) is not None:
            continue
        try:
            module = entry_point.load()
            manager.register(module, name=entry_point.name)
            if entry_point.dist is not None:
                _entry_point_distributions.setdefault(entry_point.module.split(".")[0],
                                                      _name_and_version(entry_point.dist))
        except Exception as error:  # a broken plugin must not take the others down
            _load_failures[entry_point.name] = f"{type(error).__name__}: {error}"
            print(f"ddpo: plugin '{entry_point.name}' failed to load: {type(error).__name__}: {error}",
                  file=sys.stderr)
    return manager


def _register_each(registry: Registry, hook, register) -> None:
    """Call a `register_*` hook plugin by plugin, so one that raises is reported by name and the others load."""
    for implementation in hook.get_hookimpls():
        try:
            implementation.function(register=register)
        except Exception as error:
            failure = f"{hook.name} raised {type(error).__name__}: {error}"
            registry.failures[implementation.plugin_name] = failure
            print(f"ddpo: plugin '{implementation.plugin_name}' failed to load: {failure}", file=sys.stderr)


@functools.cache
def get_registry() -> Registry:
    """All registered plugin classes, built once per process from the registration hooks."""
    manager = get_plugin_manager()
    registry = Registry(failures=dict(_load_failures))
    _register_each(registry, manager.hook.register_algorithms, _make_register(registry, "algorithms", Algorithm))
    _register_each(registry, manager.hook.register_rewards, _make_register(registry, "rewards", Reward))
    _register_each(registry, manager.hook.register_models, _make_register(registry, "models", Model))
    _register_each(registry, manager.hook.register_prompts, _make_register(registry, "prompts", PromptSet))
    manager.hook.register_presets(register=make_register(registry.presets))
    return registry
