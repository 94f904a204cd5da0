"""``kiln.toml`` recipes: one file that says what to build, read with ``tomllib`` and checked whole.

::

    [model]
    source = "resnet"                 # zoo name, path/to/file.py:factory or package.module:factory
    weights = "weights.pt"            # optional: a state dict, loaded with weights_only=True
    inputs = [{ name = "x", shape = [1, 3, 32, 32], dtype = "float32", dynamic = { 0 = "batch" } }]
    kv_cache = "float"                # a causal LM's KV cache: float, int8, int8-calibrated

    [[passes]]
    name = "fold_batchnorm"

    [[passes]]
    name = "quantize"
    options = { calibrator = "percentile" }

    [calibration]
    source = "calib.npz"              # .npz / .pt file, or module:function returning batches

    [evaluation]
    source = "data.py:validation"     # batches of (inputs, labels)
    metric = "top1"                   # or module:function(outputs, labels) -> float

    [backend]
    name = "onnxruntime"
    options = { intra_op_threads = 2 }

    [verify]
    min_cosine = 0.99                 # or atol / rtol

    [gate]
    max_accuracy_drop = 0.5           # points
    max_latency_ms = 5.0
    max_size_mb = 2.0

Every table and key is checked: an unknown or mistyped key is a :class:`ConfigError` naming the
file, the line and the valid keys; pass and backend options are checked by their own declarations.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import tomllib

from torchkiln.errors import ConfigError

KV_CACHES = ("float", "int8", "int8-calibrated")  # torchkiln.compiler.kv_cache.MODES (recipe.py imports no torch)

# table -> key -> (type, required)
_SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], bool]]] = {
    "model": {"source": (str, True), "weights": (str, False), "inputs": (list, False), "kv_cache": (str, False)},
    "passes": {"name": (str, True), "options": (dict, False)},
    "calibration": {"source": (str, True), "batches": (int, False)},
    "training": {"source": (str, True), "batches": (int, False), "validation": (str, False)},
    "evaluation": {"source": (str, True), "metric": (str, False)},
    "backend": {"name": (str, True), "options": (dict, False)},
    "partition": {"stages": (int, True), "balance": (str, False), "backend": (str, False)},
    "tune": {"trials": (int, True), "space": (dict, True), "objectives": (list, False), "sampler": (str, False),
             "seed": (int, False), "pruner": (str, False)},
    "verify": {"atol": ((int, float), False), "rtol": ((int, float), False), "min_cosine": ((int, float), False)},
    "gate": {
        "max_accuracy_drop": ((int, float), False),
        "max_latency_ms": ((int, float), False),
        "max_size_mb": ((int, float), False),
    },
}
# key -> (rule, the rule in words), for finite numbers
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "atol": (lambda v: v >= 0, ">= 0"),
    "rtol": (lambda v: v >= 0, ">= 0"),
    "min_cosine": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "max_accuracy_drop": (lambda v: True, "a finite number of points"),
    "max_latency_ms": (lambda v: v > 0, "> 0"),
    "max_size_mb": (lambda v: v > 0, "> 0"),
}
_INPUT_KEYS = {"name": (str, True), "shape": (list, True), "dtype": (str, False), "dynamic": (dict, False)}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    dynamic: tuple[tuple[int, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    model: str
    weights: Path | None
    inputs: tuple[InputSpec, ...]
    passes: tuple[tuple[str, Mapping[str, Any]], ...]
    calibration: Mapping[str, Any] | None
    evaluation: Mapping[str, Any] | None
    backend: str
    backend_options: Mapping[str, Any]
    verify: Mapping[str, float]
    gate: Mapping[str, float]
    raw: Mapping[str, Any]  # the parsed file, for the manifest
    partition: Mapping[str, Any] | None = None
    tune: Mapping[str, Any] | None = None  # checked in full by torchkiln.workflows.tuning
    training: Mapping[str, Any] | None = None  # batches for distill (train_data / val_data)
    kv_cache: str = "float"  # a causal LM's KV cache (torchkiln.compiler.kv_cache.MODES)

    def resolve(self, relative: str) -> Path:
        """A path in the recipe, relative to the recipe's directory."""
        path = Path(relative)
        return path if path.is_absolute() else self.path.parent / path

    def files(self) -> list[tuple[str, Path]]:
        """``(what, path)`` of every file the build reads: the recipe, and each path key's file that
        exists (``model.py`` of ``model.py:factory``, a weights or ``.npz`` file; not a zoo name)."""
        found = [("the recipe", self.path)]
        for table, key in PATH_KEYS:
            section = self.raw.get(table)
            value = section.get(key) if isinstance(section, Mapping) else None
            if isinstance(value, str):
                path = self.resolve(value.split(":")[0] if ".py:" in value else value)
                if path.exists():
                    found.append((f"[{table}] {key}", path))
        return found


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}", where=str(path)) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: the recipe is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
            where=f"{path}:{line}",
            hint="TOML files are UTF-8; re-save the recipe as UTF-8",
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}", where=str(path)) from None
    checker = _Checker(path, text)
    checker.tables(data)
    model = checker.table(data, "model", required=True)
    assert model is not None  # required: table() raised otherwise
    if model.get("kv_cache", "float") not in KV_CACHES:
        checker.fail("model", "kv_cache", f"must be one of {', '.join(KV_CACHES)}, got '{model['kv_cache']}'")
    passes = data.get("passes", [])
    if not isinstance(passes, list):
        checker.fail("passes", None, "write each pass as a [[passes]] table")
    for index, entry in enumerate(passes):
        checker.table({"passes": entry}, "passes", label=f"passes[{index}]")
    backend = checker.table(data, "backend") or {"name": "onnxruntime"}
    verify = checker.numbers("verify", checker.table(data, "verify") or {})
    if "min_cosine" in verify and ("atol" in verify or "rtol" in verify):
        checker.fail("verify", "min_cosine", "give min_cosine or atol/rtol, not both")
    partition = checker.table(data, "partition")
    if partition is not None and model.get("kv_cache", "float") != "float":
        checker.fail("model", "kv_cache", "an int8 KV cache is not supported with [partition]: drop one of them")
    if partition is not None and partition["stages"] < 1:
        checker.fail("partition", "stages", f"must be >= 1, got {partition['stages']}")
    if partition is not None and partition.get("balance", "latency") not in ("latency", "memory", "params"):
        checker.fail("partition", "balance", f"must be latency, memory or params, got '{partition['balance']}'")
    calibration = checker.table(data, "calibration")
    if calibration is not None and calibration.get("batches", 1) < 1:
        checker.fail("calibration", "batches", f"must be >= 1, got {calibration['batches']}")
    training = checker.table(data, "training")
    if training is not None and training.get("batches", 1) < 1:
        checker.fail("training", "batches", f"must be >= 1, got {training['batches']}")
    if training is None and any(isinstance(p, dict) and p.get("name") == "distill" for p in passes):
        checker.fail("training", None, "the distill pass trains: add a [training] table with source = "
                     '"file.py:function" returning its batches of inputs or (inputs, labels)')  # fmt: skip
    return Recipe(
        path=path,
        model=model["source"],
        weights=Path(model["weights"]) if "weights" in model else None,
        inputs=tuple(checker.input(i, spec) for i, spec in enumerate(model.get("inputs", []))),
        passes=tuple((p["name"], dict(p.get("options", {}))) for p in passes),
        calibration=calibration,
        evaluation=checker.table(data, "evaluation"),
        backend=backend["name"],
        backend_options=dict(backend.get("options", {})),
        verify=verify,
        gate=checker.numbers("gate", checker.table(data, "gate") or {}),
        raw=data,
        partition=partition,
        tune=checker.table(data, "tune"),
        training=training,
        kv_cache=model.get("kv_cache", "float"),
    )


#: (table, key) of the values that name files relative to the recipe (``file.py:function`` or data)
PATH_KEYS = (("model", "source"), ("model", "weights"), ("calibration", "source"), ("evaluation", "source"),
             ("training", "source"), ("training", "validation"))  # fmt: skip


def line_in(path: Path, table: str, key: str | None) -> int | None:
    """The line of ``key`` inside ``[table]`` (or a sub-table of it) in the recipe at ``path``;
    None when it is not found or the file cannot be read."""
    try:
        return _Checker(path, path.read_text(encoding="utf-8")).line_of(table, key)
    except (OSError, UnicodeDecodeError):
        return None


class _Checker:
    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def line_of(self, table: str, key: str | None) -> int | None:
        """The line of ``key`` inside ``[table]`` or a sub-table of it (or of the table header), by a
        plain scan: ``key =``, ``"key" =`` (a quoted dotted key) or ``key.x =`` (a bare dotted one),
        also inside an inline table."""
        header = re.compile(rf"^\s*\[\[?\s*{re.escape(table)}\s*(\.[^\]]*)?\]\]?\s*$")
        name = re.escape(key or "")
        entry = re.compile(rf"""(^|[\s{{,])(["']{name}["']|{name})\s*[=.]""")
        inside = False
        for number, line in enumerate(self.lines, 1):
            if header.match(line):
                if key is None:
                    return number
                inside = True
            elif re.match(r"^\s*\[", line):
                inside = False
            elif inside and key is not None and entry.search(line):
                return number
        return None

    def fail(self, table: str, key: str | None, message: str, hint: str | None = None) -> NoReturn:
        line = self.line_of(table, key)
        where = f"{self.path}:{line}" if line else str(self.path)
        name = f"[{table}] {key}" if key else f"[{table}]"
        raise ConfigError(f"{where}: {name}: {message}", where=f"{table}.{key}" if key else table, hint=hint)

    def tables(self, data: Mapping[str, Any]) -> None:
        for name in data:
            if name not in _SCHEMA:
                self.fail(name, None, "unknown table", hint=f"tables are: {', '.join(_SCHEMA)}")

    def table(
        self, data: Mapping[str, Any], name: str, required: bool = False, label: str | None = None
    ) -> dict[str, Any] | None:
        if name not in data:
            if required:
                raise ConfigError(f"{self.path}: the [{name}] table is missing", where=name)
            return None
        values = data[name]
        if not isinstance(values, dict):
            self.fail(name, None, f"must be a table, got {type(values).__name__}")
        self._keys(name, values, _SCHEMA[name], label)
        return dict(values)

    def numbers(self, table: str, values: Mapping[str, Any]) -> dict[str, float]:
        """Finite numbers within each key's range (``_RANGES``)."""
        checked = {}
        for key, value in values.items():
            rule, text = _RANGES[key]
            number = float(value)
            if not (math.isfinite(number) and rule(number)):
                self.fail(table, key, f"must be {text}, got {value!r}")
            checked[key] = number
        return checked

    def input(self, index: int, spec: Any) -> InputSpec:
        if not isinstance(spec, dict):
            self.fail("model", "inputs", f"input {index} must be a table like {{ name = \"x\", shape = [1, 3] }}")
        self._keys("model", spec, _INPUT_KEYS, f"model.inputs[{index}]", line_key="inputs")
        shape = spec["shape"]
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            self.fail("model", "inputs", f"input '{spec['name']}': shape must be positive integers, got {shape}")
        dynamic = []
        for axis, dim in dict(spec.get("dynamic", {})).items():
            if not str(axis).lstrip("-").isdigit() or not isinstance(dim, str):
                self.fail("model", "inputs", f"input '{spec['name']}': dynamic = {{ <axis> = \"<name>\" }}, got {axis!r}")
            dynamic.append((int(axis), dim))
        return InputSpec(spec["name"], tuple(shape), spec.get("dtype", "float32"), tuple(dynamic))

    def _keys(
        self,
        table: str,
        values: Mapping[str, Any],
        schema: Mapping[str, tuple[type | tuple[type, ...], bool]],
        label: str | None,
        line_key: str | None = None,
    ) -> None:
        shown = label or table
        for key, value in values.items():
            if key not in schema:
                self.fail(table, line_key or key, f"unknown key '{key}' in {shown}", hint=f"valid keys: {', '.join(schema)}")
            kind, _ = schema[key]
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
                self.fail(table, line_key or key, f"{shown}.{key} must be {expected}, got {value!r}")
        missing = [key for key, (_, required) in schema.items() if required and key not in values]
        if missing:
            self.fail(table, None, f"{shown} needs {', '.join(missing)}")
