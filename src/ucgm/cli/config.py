"""Run configs: presets and YAML files, merging, ``key=value`` overrides and validation.

A resolved config is a plain nested dict (what ``DIR/config.yaml`` and checkpoint metadata hold). A command
parses it once, at its entry, into a :class:`~ucgm.cli.schema.RunConfig` (:func:`parse_run_config`: validated,
closed sections typed) and hands that down.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..atomic import atomic_write_text
from ..validation import ConfigError
from .schema import (
    CLOSED_SECTIONS,
    FREE_SECTIONS,
    NAMED_SECTIONS,
    SECTIONS,
    RunConfig,
    default_config,
    section_keys,
    typed_section,
)
from ..yaml_io import dump_yaml, parse_yaml

PRESET_DIRECTORY = Path(__file__).resolve().parent.parent / "configs"
#: The section of a preset holding per-objective defaults, ``objectives: {NAME: {SECTION: {...}}}``.
OBJECTIVE_DEFAULTS = "objectives"
#: The sections an ``objectives.NAME`` entry may set.
OBJECTIVE_DEFAULT_SECTIONS = ("data", "model", "transport", "objective", "networks", "optimizer", "training",
                              "sampling")

#: ``accepted_keys(section, name)``: the option names the component ``name`` of an open section accepts, or
#: ``None`` when unknown. Lets overrides name options a preset does not list.
AcceptedKeys = Callable[[str, str], Optional[Iterable[str]]]


def _no_accepted_keys(section: str, name: str) -> None:
    return None


# ------------------------------------------------------------------------------------------- sources
def preset_names() -> list[str]:
    """Names of the bundled presets (``gmm``, ``digits``, ...)."""
    return sorted(path.stem for path in PRESET_DIRECTORY.glob("*.yaml"))


def read_yaml_mapping(path: Path) -> dict:
    """Parse a YAML file that must hold a mapping."""
    try:
        value = parse_yaml(path.read_text(encoding="utf-8"))
    except Exception as error:  # yaml.YAMLError, UnicodeDecodeError, OSError
        raise ConfigError(f"cannot read config {str(path)!r}: {error}") from error
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config {str(path)!r} must hold a YAML mapping of sections, got {type(value).__name__}")
    return value


def load_config_source(source: str) -> dict:
    """The raw mapping of a YAML path or of a preset name."""
    path = Path(source)
    if path.is_file():
        return read_yaml_mapping(path)
    if source in preset_names():
        return read_yaml_mapping(PRESET_DIRECTORY / f"{source}.yaml")
    hint = difflib.get_close_matches(source, preset_names(), n=1)
    suggestion = f"; did you mean preset {hint[0]!r}?" if hint else ""
    raise ConfigError(f"config {source!r} is neither a YAML file nor a preset "
                      f"(presets: {', '.join(preset_names())}){suggestion}")


# --------------------------------------------------------------------------------------------- merge
def merge_configs(base: dict, update: dict) -> dict:
    """A deep copy of ``base`` with ``update`` merged in: mappings merge recursively, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def unknown_key_error(key: str, valid: Iterable[str], what: str = "config key") -> ConfigError:
    """``unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?``"""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return ConfigError(f"unknown {what} {key!r}; did you mean {close[0]!r}?")
    return ConfigError(f"unknown {what} {key!r}; valid keys: {', '.join(valid)}")


def _check_known_keys(raw: dict) -> None:
    for section, values in raw.items():
        if section not in SECTIONS:
            raise unknown_key_error(section, SECTIONS, "config section")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        if section in CLOSED_SECTIONS:
            valid = section_keys(section)
            for key in _leaf_keys(values, section):
                if key not in valid:
                    raise unknown_key_error(key, valid)


def _leaf_keys(values: dict, prefix: str) -> list[str]:
    """Dotted keys of a nested mapping, those of the nested mappings included."""
    keys = []
    for key, value in values.items():
        dotted = f"{prefix}.{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += _leaf_keys(value, dotted)
    return keys


def complete_config(raw: dict) -> dict:
    """Check the section and closed-section keys of ``raw`` and fill every default."""
    _check_known_keys(raw)
    return merge_configs(default_config(), raw)


# ------------------------------------------------------------------------------------------ validate
def parse_run_config(config: dict) -> RunConfig:
    """Check a complete config and type its closed sections; raises :class:`ConfigError` naming the bad key."""
    _check_known_keys(config)
    for name in NAMED_SECTIONS:
        component = config.get(name, {}).get("name")
        if not isinstance(component, str) or not component:
            raise ConfigError(f"{name}.name={component!r} is invalid: every config must name its {name} "
                              f"(e.g. `{name}=NAME` on the command line)")
    sections = {}
    for name in CLOSED_SECTIONS:
        try:
            sections[name] = typed_section(config, name)
        except TypeError as error:
            raise ConfigError(f"config section {name!r} is malformed: {error}") from error
        sections[name].validate()
    return RunConfig(values=config, **sections)


def as_run_config(config: RunConfig | dict) -> RunConfig:
    """``config`` itself when parsed already, else the parsed resolved dict ``config``."""
    return config if isinstance(config, RunConfig) else parse_run_config(complete_config(config))


# ----------------------------------------------------------------------------------------- overrides
def config_keys(config: dict, accepted_keys: AcceptedKeys = _no_accepted_keys) -> list[str]:
    """Every dotted key an override may set: the schema's, the open sections' present keys and the options
    their named components accept."""
    keys = list(SECTIONS)
    for section in SECTIONS:
        if section in CLOSED_SECTIONS:
            keys += section_keys(section)
            continue
        values = config.get(section, {})
        keys += _leaf_keys(values, section) + [f"{section}.name"]
        if isinstance(values.get("name"), str):
            keys += [f"{section}.{key}" for key in accepted_keys(section, values["name"]) or ()]
    return sorted(set(keys))


def parse_override(text: str) -> tuple[str, object]:
    """``'optimizer.lr=1e-3'`` -> ``('optimizer.lr', 0.001)``; values are YAML scalars, lists or mappings."""
    key, separator, value = text.partition("=")
    key = key.strip()
    if not separator or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
    try:
        return key, parse_yaml(value) if value.strip() else None
    except Exception as error:  # yaml.YAMLError
        raise ConfigError(f"override {text!r}: cannot parse the value as YAML ({error})") from error


def apply_override(config: dict, key: str, value, accepted_keys: AcceptedKeys = _no_accepted_keys) -> dict:
    """Set dotted ``key`` to ``value`` in a copy of ``config``.

    ``SECTION=NAME`` for an open section sets ``SECTION.name``; when that changes the component, the section's
    other options are dropped (they belonged to the previous component) and, for the objective, the preset's
    defaults for the new one apply (:func:`switch_objective`). An unknown key is an error that names the closest
    valid key.
    """
    config = copy.deepcopy(config)
    parts = key.split(".")
    section = parts[0]
    if len(parts) == 1 and section in SECTIONS and not isinstance(value, dict):
        if section in CLOSED_SECTIONS:
            raise ConfigError(f"override {key}={value!r}: section {section!r} needs a key, e.g. "
                              f"{section_keys(section)[0]}=...")
        parts, key = [section, "name"], f"{section}.name"
    if section not in FREE_SECTIONS and key not in config_keys(config, accepted_keys):
        raise unknown_key_error(key, config_keys(config, accepted_keys))
    renames_component = len(parts) == 2 and parts[1] == "name" and section not in CLOSED_SECTIONS
    if renames_component and config[section].get("name") != value:
        if section == "objective":
            return switch_objective(config, value)
        config[section] = {}
    target = config
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {key}: {part!r} is not a mapping")
    target[parts[-1]] = value
    return config


def switch_objective(config: dict, name) -> dict:
    """A copy of ``config`` training objective ``name``: the objective section becomes ``{"name": name}`` plus the
    preset's per-objective defaults ``objectives.NAME.objective``, and the entry's other sections
    (:data:`OBJECTIVE_DEFAULT_SECTIONS`) are merged over the config (e.g. the TrigFlow transport sCM needs).

    Without an ``objectives.NAME`` entry only the objective section changes (to the class defaults).
    """
    entries = config.get(OBJECTIVE_DEFAULTS, {}) or {}
    entry = entries.get(name, {}) if isinstance(name, str) else {}
    if not isinstance(entry, dict):
        raise ConfigError(f"{OBJECTIVE_DEFAULTS}.{name} must be a mapping of sections, got {entry!r}")
    unknown = sorted(set(entry) - set(OBJECTIVE_DEFAULT_SECTIONS))
    if unknown:
        raise ConfigError(f"{OBJECTIVE_DEFAULTS}.{name} sets section(s) {unknown}; allowed sections: "
                          f"{', '.join(OBJECTIVE_DEFAULT_SECTIONS)}")
    config = merge_configs(config, {key: value for key, value in entry.items() if key != "objective"})
    config["objective"] = {"name": name, **copy.deepcopy(entry.get("objective", {}))}
    return config


def apply_overrides(config: dict, overrides: Sequence[str], accepted_keys: AcceptedKeys = _no_accepted_keys) -> dict:
    """Apply ``key=value`` strings in order."""
    for text in overrides:
        key, value = parse_override(text)
        config = apply_override(config, key, value, accepted_keys)
    return config


# ------------------------------------------------------------------------------------------ resolve
def resolve_run_config(source: str | dict, overrides: Sequence[str] = (),
                       accepted_keys: AcceptedKeys = _no_accepted_keys) -> RunConfig:
    """Load a preset name / YAML path (or take a mapping), fill defaults, apply overrides and parse."""
    raw = load_config_source(source) if isinstance(source, str) else source
    config = apply_overrides(complete_config(raw), overrides, accepted_keys)
    return parse_run_config(complete_config(config))


def resolve_config(source: str | dict, overrides: Sequence[str] = (),
                   accepted_keys: AcceptedKeys = _no_accepted_keys) -> dict:
    """The plain dict of :func:`resolve_run_config` (what ``DIR/config.yaml`` holds)."""
    return resolve_run_config(source, overrides, accepted_keys).values


def save_config(config: dict, path: Path) -> None:
    """Write ``config`` as YAML atomically."""
    atomic_write_text(path, dump_yaml(config))


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            keys += config_differences(before, after, f"{dotted}.")
        elif before != after:
            keys.append(dotted)
    return keys
