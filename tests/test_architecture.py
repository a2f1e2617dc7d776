"""The package's layering: every import between top-level units of ``ucgm`` goes down the layer order (so there
are no import cycles), and the base layers import nothing from methods, sampling, training or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ucgm"
#: Top-level units from the bottom up; a unit may import units of its own layer or below.
LAYERS = (
    ("__init__", "transports", "timegrids", "conventions", "validation", "seeding", "atomic", "yaml_io"),
    ("models",),
    ("data",),
    ("metrics",),
    ("methods",),
    ("sampling",),
    ("analysis",),
    ("training",),
    ("interop",),
    ("cli",),
    ("bench", "__main__"),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
BASE = {"transports", "timegrids", "conventions", "validation", "models", "data", "metrics"}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> list[tuple[str, str, str]]:
    """``(importing unit, imported unit, file)`` for every import of another unit inside ``ucgm``."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
        module = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [base] if node.module else [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "ucgm" and _unit(target) != _unit(module):
                    found.append((_unit(module), _unit(target), str(path.relative_to(PACKAGE))))
    return found


def test_every_unit_has_a_layer():
    units = {path.stem if path.is_file() else path.name for path in PACKAGE.iterdir()
             if (path.suffix == ".py" or (path / "__init__.py").is_file())}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


def test_imports_go_down_the_layers():
    upward = [f"{file}: {source} imports {target}" for source, target, file in _imports()
              if target in RANK and RANK[target] > RANK[source]]
    assert not upward, "imports against the layer order:\n" + "\n".join(sorted(set(upward)))


def test_base_layers_import_no_methods_sampling_training_or_cli():
    forbidden = {"methods", "sampling", "analysis", "training", "interop", "cli", "bench"}
    offending = [f"{file}: {source} imports {target}" for source, target, file in _imports()
                 if source in BASE and target in forbidden]
    assert not offending, "\n".join(sorted(set(offending)))


def test_there_are_no_import_cycles_between_units():
    graph: dict[str, set[str]] = {}
    for source, target, _ in _imports():
        graph.setdefault(source, set()).add(target)
    visiting, done = set(), set()

    def visit(unit: str, chain: tuple[str, ...]) -> None:
        assert unit not in visiting, f"import cycle: {' -> '.join(chain + (unit,))}"
        if unit in done:
            return
        visiting.add(unit)
        for target in graph.get(unit, ()):
            visit(target, chain + (unit,))
        visiting.discard(unit)
        done.add(unit)

    for unit in list(graph):
        visit(unit, ())
