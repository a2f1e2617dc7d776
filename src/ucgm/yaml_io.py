"""YAML reading and writing for configs: safe loading, with ``1e-4``-style floats read as numbers."""

from __future__ import annotations

import re
from typing import Any

import yaml


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats without a dot (``1e-4``, ``5E3``), which YAML 1.1 reads as text."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader`."""
    return yaml.load(text, Loader=ConfigLoader)


class _ConfigDumper(yaml.SafeDumper):
    """Safe dumper writing mappings in block style and lists inline (``betas: [0.9, 0.95]``)."""


def _represent_inline_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)


_ConfigDumper.add_representer(list, _represent_inline_list)
_ConfigDumper.add_representer(tuple, _represent_inline_list)


def dump_yaml(value: Any) -> str:
    """YAML text with keys in insertion order, mappings in block style and lists inline."""
    return yaml.dump(value, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)
