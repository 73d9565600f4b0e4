"""Every shipped preset is its paper's recipe, key by key: docs/presets.md has a row for each key of each preset
with its value, the official value and its source. A preset key that changes without its row fails here."""

import re
from pathlib import Path

import pytest
import yaml

from ddpo.core.configuration.presets import BUILTIN_DIRECTORY, find_preset
from ddpo.core.plugin_api.registry import get_registry

TABLE = Path(__file__).parent.parent / "docs" / "presets.md"


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def documented() -> dict[str, dict[str, object]]:
    """docs/presets.md's tables: preset -> key -> the value in its `value` column (parsed as YAML)."""
    tables: dict[str, dict[str, object]] = {}
    preset = None
    for line in TABLE.read_text().splitlines():
        if line.startswith("## "):
            preset = line[3:].strip()
            tables[preset] = {}
        row = re.match(r"\| `([^`]+)` \| `([^`]*)` \|", line)
        if row and preset is not None:
            tables[preset][row[1]] = yaml.safe_load(row[2])
    return tables


def builtin_presets() -> list[str]:
    return sorted(name for name, preset in get_registry().presets.items() if preset.path.parent == BUILTIN_DIRECTORY)


def test_every_builtin_preset_has_a_table():
    assert set(documented()) == set(builtin_presets())


@pytest.mark.parametrize("name", builtin_presets())
def test_each_preset_key_has_its_row_with_the_presets_value(name):
    preset = flatten(find_preset(get_registry().presets, name).config)
    rows = documented()[name]
    assert sorted(rows) == sorted(preset), "rows and preset keys differ"
    for key, value in preset.items():
        assert rows[key] == value, f"{name}: {key} is {value!r} in the preset, {rows[key]!r} in docs/presets.md"
