"""The layers import one way: compiler/ (IR, tracing, pass infrastructure, verification) and
passes/ never import a backend or the driver; backends never import passes or the driver; only the
driver (compile, CompiledModel, the cache, auto) and the CLI sit above both."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchkiln"


def imported_modules(path: Path) -> set[str]:
    """Absolute torchkiln modules imported anywhere in ``path`` (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("torchkiln.")}


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("compiler", ("torchkiln.backends", "torchkiln.driver", "torchkiln.passes", "torchkiln.cli")),
        ("passes", ("torchkiln.backends", "torchkiln.driver", "torchkiln.cli")),
        ("backends", ("torchkiln.passes", "torchkiln.driver", "torchkiln.cli")),
    ],
)
def test_a_layer_imports_nothing_above_it(layer, forbidden):
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if m.startswith(forbidden))
        for path in sorted((PACKAGE / layer).rglob("*.py"))
    }
    assert {p: m for p, m in offenders.items() if m} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from torchkiln.driver.cache import Hasher\n")
    assert "torchkiln.driver.cache" in imported_modules(source)
