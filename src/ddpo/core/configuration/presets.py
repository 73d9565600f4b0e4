"""Presets: a paper's recipe as a documented YAML config layer, chosen with `ddpo run --preset NAME`.

A preset file is a config (DESIGN.md §5) plus a `preset:` mapping that says where it comes from (paper, number
of GPUs the recipe assumes, a one-line description); comments in the file cite the source of each number.
It is a layer above the plugins' defaults and below `--config`, `--set` and named flags, so any of those
overrides it. Built-in presets are `ddpo/presets/*.yaml`, registered through the `register_presets` hook like
a third-party plugin's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml

from ddpo.core.configuration.errors import UsageError, unknown_name_error
from ddpo.core.plugin_api.hookspecs import hookimpl

BUILTIN_DIRECTORY = Path(__file__).resolve().parents[2] / "presets"


class PresetInfo(pydantic.BaseModel):
    """The `preset:` mapping of a preset file."""

    model_config = pydantic.ConfigDict(extra="forbid", use_attribute_docstrings=True)
    paper: str
    """The paper (or code) whose recipe this is."""
    gpus: int = pydantic.Field(ge=1)
    """GPUs (processes) the recipe assumes: `sample.batch_size` and `train.batch_size` are per process."""
    description: str
    """One line: what the preset trains."""


@dataclass
class Preset:
    """A registered preset: its name (the file's stem), its file, what it says about itself, and its config
    layer (the file without its `preset:` mapping)."""

    name: str
    path: Path
    info: PresetInfo
    config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), **self.info.model_dump()}


def read_preset_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read preset file {path}: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise UsageError(f"preset file {path} must hold a mapping of config keys")
    return data


def load_preset(path: str | Path) -> Preset:
    """A preset from its YAML file; a UsageError if the `preset:` mapping is missing or invalid."""
    path = Path(path)
    data = read_preset_file(path)
    try:
        info = PresetInfo.model_validate(data.get("preset"))
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in ("preset", *first["loc"]))
        raise UsageError(f"preset file {path}: '{where}': {first['msg']}") from None
    return Preset(path.stem, path, info, {key: value for key, value in data.items() if key != "preset"})


def find_preset(presets: dict[str, Preset], name: str) -> Preset:
    """The preset registered as `name`, or a UsageError listing the valid names."""
    if name not in presets:
        raise unknown_name_error("preset", name, presets)
    return presets[name]


def make_register(presets: dict[str, Preset]):
    """The `register` function handed to `register_presets`: it takes the path of a preset YAML file."""
    def register(path: str | Path) -> None:
        preset = load_preset(path)
        presets[preset.name] = preset

    return register


def list_presets(presets: dict[str, Preset], as_json: bool = False) -> str:
    """`ddpo list presets`: name, GPUs, paper and description of each preset (or JSON)."""
    items = [presets[name].as_dict() for name in sorted(presets)]
    if as_json:
        return json.dumps({"presets": items}, indent=2) + "\n"
    width = max((len(item["name"]) for item in items), default=0)
    lines = ["presets:"] + [f"  {item['name']:<{width}} {item['gpus']:>3} GPU{'s' if item['gpus'] > 1 else ' '}  "
                            f"{item['paper']}\n      {item['description']}" for item in items]
    return "\n".join(lines) + "\n"


@hookimpl
def register_presets(register) -> None:
    for path in sorted(BUILTIN_DIRECTORY.glob("*.yaml")):
        register(path)
