"""The layers import one way: compiler/ (IR, tracing, pass infrastructure, verification) and
passes/ never import a backend or the driver; backends never import passes or the driver; the
driver (compile, CompiledModel, the cache, auto) sits above both, workflows/ (build, tune, compare,
bench, the pipeline runtime) above the driver, and cli/ on top: a command parses its arguments,
calls a workflow and prints, and never imports another command's module."""

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
        ("compiler", ("torchkiln.backends", "torchkiln.driver", "torchkiln.passes", "torchkiln.cli", "torchkiln.workflows")),
        ("passes", ("torchkiln.backends", "torchkiln.driver", "torchkiln.cli", "torchkiln.workflows")),
        ("backends", ("torchkiln.passes", "torchkiln.driver", "torchkiln.cli", "torchkiln.workflows")),
        ("driver", ("torchkiln.workflows", "torchkiln.cli")),
        ("workflows", ("torchkiln.cli",)),
        ("models", ("torchkiln.workflows", "torchkiln.cli")),
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


#: what every command may share: the argument helpers (cli/common.py) and the entry point
CLI_SHARED = {"common", "main"}


def test_a_command_imports_no_other_command():
    offenders = {}
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        if path.name in ("__init__.py", "__main__.py", "common.py"):
            continue
        cli = [m.split(".") for m in imported_modules(path) if m.startswith("torchkiln.cli.")]
        others = {".".join(parts[:3]) for parts in cli if parts[2] not in CLI_SHARED}
        if others:
            offenders[path.name] = sorted(others)
    assert offenders == {}


def test_the_package_root_holds_only_the_api_and_the_error_vocabulary():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "errors.py"]


def test_a_recipe_through_kiln_build_never_returns_to_the_cli(tmp_path):
    """Every torchkiln module a build executes, from the moment cli/build.py hands over to the
    workflow: none is a cli module (the frames of the call, traced)."""
    import sys

    from torchkiln.cli import main

    (tmp_path / "kiln.toml").write_text('[model]\nsource = "mlp"\n\n[[passes]]\nname = "cleanup"\n\n[backend]\nname = "torch"\n')
    seen: list[str] = []
    entered, built = [False], [False]

    def tracer(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        building = module == "torchkiln.workflows.build" and frame.f_code.co_name == "build"
        if event == "call":
            if building:
                entered[0] = built[0] = True
            elif entered[0] and module.startswith("torchkiln."):
                seen.append(f"{module}.{frame.f_code.co_name}")
        elif event == "return" and building:  # the CLI has its turn again (it prints the result)
            entered[0] = False
        return None

    sys.setprofile(tracer)
    try:
        code = main(["build", str(tmp_path / "kiln.toml"), "--no-cache", "--quiet"])
    finally:
        sys.setprofile(None)
    assert code == 0 and built[0]
    assert seen and not [s for s in seen if s.startswith("torchkiln.cli")], sorted(set(seen))
