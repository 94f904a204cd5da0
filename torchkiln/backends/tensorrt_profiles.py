"""What a TensorRT engine is built for: optimization profiles and the GPU/TensorRT it may run on.

Pure functions (no TensorRT, no GPU) so they are tested everywhere.

Profiles. Every input with dynamic axes gets one (min, opt, max) shape. A dynamic axis is named
(``batch``, ``sequence``); its default range is ``1 : traced size : 4 × traced size``, and the
``profile`` option overrides it per name: ``batch=1:8:32``. Axes sharing a name share a range, so
two inputs with the same ``sequence`` axis stay consistent.

Compatibility. A serialized engine only runs on the TensorRT version that built it and (unless
built hardware-compatible) on the same GPU architecture; loading one elsewhere fails deep inside
TensorRT or, worse, works and computes garbage. The artifact records both and refuses up front.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torchkiln.compiler.program import TensorSpec
from torchkiln.errors import ArtifactError, ConfigError

Range = tuple[int, int, int]


def parse_ranges(items: Sequence[str]) -> dict[str, Range]:
    """``("batch=1:8:32", "sequence=16:128:512")`` -> ``{"batch": (1, 8, 32), ...}``."""
    ranges: dict[str, Range] = {}
    for item in items:
        name, eq, text = item.partition("=")
        parts = text.split(":")
        if not eq or len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ConfigError(
                f"bad profile '{item}'",
                where="backend tensorrt.profile",
                hint="write axis=min:opt:max, e.g. batch=1:8:32",
            )
        low, opt, high = (int(p) for p in parts)
        if not 1 <= low <= opt <= high:
            raise ConfigError(
                f"profile '{item}' must satisfy 1 <= min <= opt <= max", where="backend tensorrt.profile"
            )
        ranges[name.strip()] = (low, opt, high)
    return ranges


def profile_shapes(
    specs: Sequence[TensorSpec], traced: Mapping[str, Sequence[int]], overrides: Mapping[str, Range]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per input that has a dynamic axis; static inputs need none."""
    names = {d for spec in specs for d in spec.shape if isinstance(d, str)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(
            f"profile names axis {', '.join(unknown)}, which no input has",
            where="backend tensorrt.profile",
            hint=f"dynamic axes: {', '.join(sorted(names)) or 'none (compile with dynamic_axes)'}",
        )
    shapes = {}
    for spec in specs:
        if not any(isinstance(d, str) for d in spec.shape):
            continue
        size = list(traced[spec.name])
        bounds = [
            overrides.get(d, (1, size[i], 4 * size[i])) if isinstance(d, str) else (d, d, d)
            for i, d in enumerate(spec.shape)
        ]
        shapes[spec.name] = tuple(tuple(b[k] for b in bounds) for k in range(3))
    return shapes  # type: ignore[return-value]


def check_shape(
    name: str, shape: Sequence[int], bounds: tuple[Sequence[int], Sequence[int], Sequence[int]]
) -> str | None:
    """Why ``shape`` is outside the profile of input ``name``, or None when it fits."""
    low, _, high = bounds
    for axis, (size, lo, hi) in enumerate(zip(shape, low, high)):
        if not lo <= size <= hi:
            return f"input '{name}' has size {size} on axis {axis}, outside the engine's profile [{lo}, {hi}]"
    return None


def device_record(tensorrt_version: str, gpu_name: str, capability: tuple[int, int]) -> dict[str, Any]:
    return {"tensorrt": tensorrt_version, "gpu": gpu_name, "compute_capability": list(capability)}


def check_compatible(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    if saved.get("tensorrt") != current.get("tensorrt"):
        raise ArtifactError(
            f"this engine was built with TensorRT {saved.get('tensorrt')}; this machine has {current.get('tensorrt')}",
            where=where,
            hint="rebuild the engine here (kiln build / kiln export --backend tensorrt)",
        )
    if list(saved.get("compute_capability", [])) != list(current.get("compute_capability", [])):
        raise ArtifactError(
            f"this engine was built for {saved.get('gpu')} (compute capability "
            f"{'.'.join(map(str, saved.get('compute_capability', [])))}); this GPU is {current.get('gpu')} "
            f"({'.'.join(map(str, current.get('compute_capability', [])))})",
            where=where,
            hint="rebuild the engine on this GPU",
        )
