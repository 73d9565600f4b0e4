"""mkdocs hooks: the reference parts of the docs site, generated from the code when the site is built.

A page asks for a generated part with an HTML comment on a line of its own, so that nothing is kept by hand
twice and nothing can drift:

- `<!-- ddpo:cli-synopsis -->`, `<!-- ddpo:cli-reference -->`: every `ddpo` command from the typer application
  (`ddpo.cli.app.build_app`), its usage, help text and options.
- `<!-- ddpo:config-reference -->`: every key of `ddpo.core.configuration.config.RunConfig` (type, bounds,
  default, what each model changes, the field's docstring) and every installed plugin's `Options`.
- `<!-- ddpo:algorithm-extras MODULE -->`: an algorithm module's docstring (its paper and math), the rows of
  docs/presets.md that compare its presets with the official code, and its algorithms' run defaults.

An unknown marker fails the build, and so does an API page (`::: module`) that renders none of the module's
members. Imports stay torch-free: the CLI, the config and the plugin registry load
without it (DESIGN.md §4).
"""

from __future__ import annotations

import ast
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

MARKER = re.compile(r"^<!-- ddpo:([a-z-]+)(?: ([\w.-]+))? -->$", re.M)
API_OBJECT = re.compile(r"^::: ([\w.]+)$", re.M)
_api_objects: dict[str, list[str]] = {}  # page -> the objects its mkdocstrings directives document
ROOT = Path(__file__).resolve().parent.parent
PLUGIN_KINDS = {"algorithms": "algorithm", "rewards": "reward", "models": "model", "prompts": "prompts"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    _api_objects[page.file.src_path] = API_OBJECT.findall(markdown)

    def replace(match: re.Match) -> str:
        name, argument = match[1], match[2]
        if name not in GENERATORS:
            raise ValueError(f"{page.file.src_path}: unknown generated part '{name}'; valid: {', '.join(GENERATORS)}")
        return GENERATORS[name](argument) if argument else GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_page_content(html: str, page, config, files) -> str:
    """Fail on an API page that documents a module without any of its members. mkdocstrings shows what a module
    defines or exports (its __all__, or a wildcard import); a module that only re-exports names imported from
    elsewhere would render as its docstring alone, without a warning."""
    for identifier in _api_objects.get(page.file.src_path, []):
        if f'id="{identifier}.' not in html:
            raise ValueError(f"{page.file.src_path}: '::: {identifier}' renders no members; if the module re-exports "
                             f"them, list them in its __all__")
    return html


# ---------------------------------------------------------------- shared formatting

def _cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    """A default as the YAML a user would type, in a code span."""
    import yaml

    if value is None:
        return "unset"
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return f"`{text}`"


def _type(annotation: Any) -> str:
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{argument}`" for argument in arguments)
    if origin in (Union, types.UnionType):
        names = [_type(argument) for argument in arguments if argument is not type(None)]
        return " or ".join(names) + (" or unset" if type(None) in arguments else "")
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(argument) for argument in arguments)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    """A field's numeric bounds and pattern, e.g. '≥ 1', '> 0, ≤ 1'."""
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    bounds = []
    for item in field.metadata:
        for attribute, symbol in symbols.items():
            if getattr(item, attribute, None) is not None:
                bounds.append(f"{symbol} {getattr(item, attribute)}")
    return ", ".join(bounds)


def _field_type(field) -> str:
    bounds = _bounds(field)
    return _type(field.annotation) + (f", {bounds}" if bounds else "")


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------- CLI

def _cli_commands() -> list[tuple[str, Any]]:
    """Every leaf command as (full name, command), in the order the app declares them. typer ships its own
    click-like command classes, read here through their public attributes."""
    from typer.main import get_command

    from ddpo.cli.app import build_app

    found = []

    def walk(command, name):
        if hasattr(command, "commands"):
            for sub_name, sub in command.commands.items():
                walk(sub, f"{name} {sub_name}")
        else:
            found.append((name, command))

    walk(get_command(build_app()), "ddpo")
    return found


def _usage(name: str, command) -> str:
    """`ddpo run [--algo TEXT] ... [--set TEXT]...`: every visible parameter, required ones without brackets."""
    metavars = {"str": "TEXT", "Path": "PATH", "int": "INT", "float": "FLOAT"}
    pieces = [name]
    for param in command.params:
        if param.hidden:
            continue
        if param.param_type_name == "argument":
            piece = param.name.upper()
        elif getattr(param, "is_flag", False):
            piece = param.opts[0]
        else:
            annotation = param.type_descriptor.annotation
            if param.multiple and get_args(annotation):
                annotation = get_args(annotation)[0]
            piece = f"{param.opts[0]} {metavars.get(getattr(annotation, '__name__', ''), 'VALUE')}"
        piece = piece if param.required else f"[{piece}]"
        pieces.append(piece + ("..." if param.multiple else ""))
    return " ".join(pieces)


def cli_synopsis() -> str:
    return "```\n" + "\n".join(_usage(name, command) for name, command in _cli_commands()) + "\n```\n"


def _param_type(param) -> str:
    if getattr(param, "is_flag", False):
        return "flag"
    annotation = param.type_descriptor.annotation
    if param.multiple:
        annotation = get_args(annotation)[0] if get_args(annotation) else annotation
    bounds = ", ".join(f"{symbol} {value}" for symbol, value in (("≥", param.min), ("≤", param.max))
                       if value is not None)
    return _type(annotation) + (f", {bounds}" if bounds else "") + (", repeatable" if param.multiple else "")


def cli_reference() -> str:
    parts = []
    for name, command in _cli_commands():
        rows = []
        for param in command.params:
            if param.hidden:
                continue
            if param.param_type_name == "argument":
                names = f"`{param.name.upper()}`"
            else:
                names = ", ".join(f"`{option}`" for option in param.opts + param.secondary_opts)
            default = param.default
            shown = "required" if param.required else "" if default in (None, False, ()) else f"`{default}`"
            rows.append([names, _param_type(param), shown, param.help or ""])
        parts.append(f"### `{name}`\n\n{command.help or ''}\n\n```\n{_usage(name, command)}\n```\n\n"
                     + (_table(["argument or option", "type", "default", "help"], rows) if rows else "No options.\n"))
    return "\n".join(parts)


# ---------------------------------------------------------------- configuration

def _model_defaults() -> dict[str, dict[str, Any]]:
    """Per model plugin: the keys whose default `ddpo config --model NAME` changes, and their values."""
    from ddpo.core.configuration.config import PLUGIN_SECTIONS, RunConfig, resolve_config
    from ddpo.core.plugin_api.registry import get_registry

    base = _flatten(RunConfig().model_dump(mode="json"))
    changed = {}
    for model in get_registry().names("models"):
        resolved = _flatten(resolve_config(flags={"model": {"name": model}}).model_dump(mode="json"))
        changed[model] = {key: value for key, value in resolved.items()
                          if base.get(key) != value and (key.split(".")[0] not in PLUGIN_SECTIONS or
                                                         key.endswith(".name"))}
    return changed


def _config_rows(model, prefix: str, per_model: dict[str, dict[str, Any]]) -> list[list[str]]:
    import pydantic

    from ddpo.core.configuration.config import PluginSection

    rows = []
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel) \
                and not issubclass(annotation, PluginSection):
            rows += _config_rows(annotation, key + ".", per_model)
            continue
        optional = [option for option in get_args(annotation)  # an optional section: its row, then its keys'
                    if isinstance(option, type) and issubclass(option, pydantic.BaseModel)]
        default = "(required)" if field.is_required() else field.get_default(call_default_factory=True)
        lookup = key
        if isinstance(default, PluginSection):
            default, lookup, kind = {"name": default.name}, key + ".name", "plugin section"
        else:
            kind = _field_type(field)
        models = ", ".join(f"{model_name}: {_value(changes[lookup])}" for model_name, changes in per_model.items()
                           if lookup in changes)
        rows.append([f"`{key}`", kind, _value(default), models, field.description or ""])
        if optional:
            rows += _config_rows(optional[0], key + ".", per_model)
    return rows


def _plugin_options(kind: str) -> str:
    from ddpo.core.plugin_api.registry import get_registry

    registry = get_registry()
    parts = []
    for name in sorted(registry.names(kind)):
        info = registry.plugins[kind][name]
        fields = info.cls.Options.model_fields
        heading = f"### {PLUGIN_KINDS[kind]}: {name}\n\n{info.cls.description()} (`{info.cls.__module__}`)\n\n"
        rows = [[f"`{PLUGIN_KINDS[kind]}.{field_name}`", _field_type(field), _value(field.default),
                 field.description or ""] for field_name, field in fields.items()]
        parts.append(heading + (_table(["key", "type", "default", "meaning"], rows) if rows else "No options.\n"))
    return "\n".join(parts)


def config_reference() -> str:
    from ddpo.core.configuration.config import RunConfig

    per_model = _model_defaults()
    run = _table(["key", "type", "default", "default with `--model` (where it differs)", "meaning"],
                 _config_rows(RunConfig, "", per_model))
    sections = [f"## Run keys\n\nGenerated from `ddpo.core.configuration.config.RunConfig` (each field's docstring) "
                f"and, for the per-model column, `ddpo config --model NAME` with the default algorithm.\n\n{run}"]
    titles = {"algorithms": "Algorithm options", "rewards": "Reward options", "models": "Model options",
              "prompts": "Prompt set options"}
    for kind, title in titles.items():
        sections.append(f"## {title}\n\nGenerated from each installed plugin's `Options` (`ddpo list {kind}` "
                        f"prints the same); set them with `--set {PLUGIN_KINDS[kind]}.KEY=VALUE`.\n\n"
                        + _plugin_options(kind))
    return "\n".join(sections)


# ---------------------------------------------------------------- algorithm pages

def _presets_rows() -> dict[str, list[list[str]]]:
    """docs/presets.md's rows that carry a note, by preset: [key, ddpo's value, official value, source, note]."""
    rows: dict[str, list[list[str]]] = {}
    preset = None
    for line in (ROOT / "docs" / "presets.md").read_text().splitlines():
        if line.startswith("## "):
            preset = line[3:].strip()
            rows[preset] = []
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        if preset and len(cells) == 5 and cells[0].startswith("`") and cells[4]:
            rows[preset].append(cells)
    return rows


def algorithm_extras(module: str) -> str:
    from ddpo.core.plugin_api.registry import get_registry

    path = ROOT / "src" / "ddpo" / "plugins" / "algorithms" / f"{module}.py"
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    registry = get_registry()
    classes = {name: registry.plugins["algorithms"][name].cls for name in registry.names("algorithms")
               if registry.plugins["algorithms"][name].cls.__module__ == f"ddpo.plugins.algorithms.{module}"}
    if not classes:
        raise ValueError(f"no algorithm plugin is defined in ddpo.plugins.algorithms.{module}")
    presets = sorted(name for name, preset in registry.presets.items()
                     if preset.config.get("algorithm", {}).get("name") in classes)
    notes = _presets_rows()
    comparison = [[f"[`{preset}`](../presets.md#{preset})", *row]
                  for preset in presets for row in notes.get(preset, [])]
    parts = [f"## The method, from the module docstring\n\n`src/ddpo/plugins/algorithms/{module}.py`:\n\n"
             f"```text\n{docstring}\n```\n",
             "## Paper vs ddpo\n\nThe rows of [Presets](../presets.md) for "
             + ", ".join(f"`{name}`" for name in presets)
             + " that carry a note: where ddpo's value differs from the official code's, or how the official setting "
               "maps onto ddpo's keys. Every other key of these recipes is the official value (the full tables, with "
               "each value's file:line, are on the Presets page; `tests/test_presets.py` keeps them in step with "
               "the shipped presets).\n\n"
             + _table(["preset", "key", "ddpo", "official", "source", "note"], comparison)]
    for name, cls in classes.items():
        defaults = _flatten(cls.run_defaults)
        digits = _flatten(cls.model_run_defaults.get("digits", {}))
        keys = [key for key in list(defaults) + [key for key in digits if key not in defaults]
                if key != "algorithm.name"]  # the algorithm naming itself
        rows = [[f"`{key}`", _value(defaults[key]) if key in defaults else "",
                 _value(digits[key]) if key in digits else ""] for key in keys]
        parts.append(f"## `{name}`: options and run defaults\n\n{cls.description()} Options: "
                     f"[configuration reference](../configuration.md#algorithm-{name}). `--algo {name}` applies "
                     f"these run defaults (`run_defaults`, and on the digits model `model_run_defaults[\"digits\"]` "
                     f"over them); `--config`, `--set` and flags override them.\n\n"
                     + (_table(["key", "`--algo " + name + "`", "on `--model digits`"], rows) if rows
                        else "It sets no run defaults.\n"))
    return "\n".join(parts)


GENERATORS = {"cli-synopsis": cli_synopsis, "cli-reference": cli_reference, "config-reference": config_reference,
              "algorithm-extras": algorithm_extras}
