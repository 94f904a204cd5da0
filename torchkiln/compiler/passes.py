"""Pass base class, the one pass registry, and pass spec parsing.

A pass is a small class with a frozen :class:`PassConfig` and one entry point, :meth:`Pass.run`,
which rewrites ``program.graph_module`` in place and returns a :class:`PassResult`. Calling the pass
(``pass_(program)``) runs it and enforces the contract: ``modified=False`` must mean the graph is
unchanged, and the module is recompiled afterwards.

Specs are strings: ``fold_batchnorm`` or ``prune:ratio=0.5,structured=true``. A pipeline string
separates passes with commas; a comma-separated token of the form ``key=value`` (without a ``:``)
continues the options of the pass before it, so ``cleanup,prune:ratio=0.5,structured=true`` is two
passes.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from torchkiln.compiler.options import Options
from torchkiln.compiler.program import Program
from torchkiln.compiler.verify import Tolerance
from torchkiln.errors import ConfigError, PassError


@dataclasses.dataclass(frozen=True)
class PassConfig(Options):
    """Options of a pass. Subclass with :func:`~torchkiln.compiler.options.option` fields."""


@dataclasses.dataclass
class PassResult:
    modified: bool
    stats: dict[str, int | float] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


class Pass(abc.ABC):
    """Base class of every graph rewrite."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    #: Lossless passes must keep outputs within the fp32 tolerance; the manager enforces it.
    lossless: ClassVar[bool] = True

    def __init__(self, config: PassConfig | None = None):
        self.config = config if config is not None else self.Config()

    def tolerance(self) -> Tolerance | None:
        """What a lossy pass promises about its outputs against the eager model (checked after it
        runs, and by ``compile`` on the artifact); None for lossless passes, which keep fp32."""
        return None

    @abc.abstractmethod
    def run(self, program: Program) -> PassResult:
        """Rewrite ``program.graph_module`` in place."""

    def __call__(self, program: Program) -> PassResult:
        before = program.graph_module.graph.python_code("self").src
        result = self.run(program)
        try:
            program.graph_module.graph.lint()
            program.graph_module.recompile()
        except Exception as exc:
            raise PassError(f"pass '{self.name}' left an invalid graph: {type(exc).__name__}: {exc}") from exc
        after = program.graph_module.graph.python_code("self").src
        if not result.modified and before != after:
            raise PassError(f"pass '{self.name}' reported modified=False but changed the graph")
        return result

    @property
    def spec(self) -> str:
        options = ",".join(f"{k}={_format(v)}" for k, v in self.config.changed().items())
        return f"{self.name}:{options}" if options else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec}>"


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "|".join(map(str, value))
    return str(value)


_REGISTRY: dict[str, type[Pass]] = {}
# Modules that define built-in passes; imported on first registry access to keep import cheap.
_BUILTIN_MODULES = (
    "torchkiln.passes.cleanup",
    "torchkiln.passes.fold_batchnorm",
    "torchkiln.passes.quantize",
    "torchkiln.passes.prune",
    "torchkiln.passes.lowrank",
    "torchkiln.passes.cluster",
    "torchkiln.passes.distill",
)
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name or not name.replace("_", "").isalnum() or name.lower() != name:
        raise TypeError(f"{cls.__name__}.name must be a snake_case string, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise TypeError(f"pass name '{name}' is already registered by {_REGISTRY[name].__name__}")
    cls.Config.owner = name
    _REGISTRY[name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    global _loaded
    if not _loaded:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise ConfigError(f"unknown pass '{name}'", where=name, hint=f"available passes: {', '.join(passes)}")
    return passes[name]


def make_pass(name: str, options: Mapping[str, Any] | None = None) -> Pass:
    cls = get_pass(name)
    return cls(cls.Config.from_mapping(options or {}, owner=name))  # type: ignore[arg-type]


def parse_pass(spec: str) -> Pass:
    """``name`` or ``name:key=value,key=value`` → a configured pass."""
    name, _, rest = spec.strip().partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(
                f"bad option '{item}' in pass spec '{spec}'", where=spec, hint="write key=value"
            )
        options[key.strip()] = value.strip()
    return make_pass(name.strip(), options)


PassItem = str | Pass | tuple[str, Mapping[str, Any]]


def parse_pipeline(passes: str | Iterable[PassItem]) -> list[Pass]:
    """A pipeline string, or a list of specs / Pass objects / ``(name, {option: value})`` pairs,
    → configured passes in order. Options given as a mapping never pass through a spec string, so
    a value can hold any text (``"0.1,structured=true"`` stays one value, and is rejected as a
    float)."""
    if not isinstance(passes, (str, Iterable)) or isinstance(passes, (bytes, Mapping)):
        raise ConfigError(
            f"passes must be a pipeline string or a list of passes, got {type(passes).__name__}",
            where="passes",
            hint='e.g. passes="cleanup,fold_batchnorm" or passes=[("prune", {"ratio": 0.5})]',
        )
    if isinstance(passes, str):
        specs: list[str] = []
        for token in filter(None, (t.strip() for t in passes.split(","))):
            if "=" in token and ":" not in token and specs:
                specs[-1] += ("," if ":" in specs[-1] else ":") + token
            else:
                specs.append(token)
        return [parse_pass(s) for s in specs]
    result = []
    for item in passes:
        if isinstance(item, Pass):
            result.append(item)
        elif isinstance(item, str):
            result.append(parse_pass(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
            result.append(make_pass(item[0], item[1]))
        else:
            raise ConfigError(
                f"a pass must be a spec string, a Pass or a (name, options) pair, got {type(item).__name__}",
                where="passes",
            )
    return result
