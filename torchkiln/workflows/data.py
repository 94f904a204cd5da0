"""Input batches from files, for calibration and evaluation data given on the command line.

``.pt`` (read with ``torch.load(weights_only=True)``) holds a tensor, a dict of tensors keyed by
input name, or a list of batches; ``.npz`` holds arrays keyed by input name (a single array may have
any key). Whole tensors are split along dim 0 into batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from torchkiln.compiler.files import names_existing
from torchkiln.errors import InputError


def load_batches(path: str | Path, names: Sequence[str], batch_size: int) -> list[Any]:
    """Batches (tensors, tuples or dicts of tensors) from a ``.pt`` or ``.npz`` file."""
    path = Path(path)
    if not names_existing(path, "file"):
        raise InputError(f"data file not found: {path}", where=str(path))
    try:
        if path.suffix == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                content: Any = {key: torch.from_numpy(archive[key]) for key in archive.files}
        elif path.suffix == ".pt":
            content = torch.load(path, weights_only=True, map_location="cpu")
        else:
            raise InputError(f"unsupported data file {path.name}", where=str(path), hint="use .pt or .npz")
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}", where=str(path)) from exc
    if isinstance(content, (list, tuple)):
        if not content:
            raise InputError(f"{path} holds an empty list of batches", where=str(path))
        return list(content)
    tensors = [content] if isinstance(content, torch.Tensor) else list(content.values()) if isinstance(content, Mapping) else []
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and (tensor.dim() == 0 or tensor.shape[0] == 0):
            raise InputError(
                f"{path} holds an array of shape {list(tensor.shape)}: no rows to split into batches",
                where=str(path),
                hint="the first axis counts the samples; give at least one",
            )
    if isinstance(content, torch.Tensor):
        return list(torch.split(content, batch_size))
    if isinstance(content, Mapping) and all(isinstance(v, torch.Tensor) for v in content.values()):
        if len(content) == 1 and len(names) == 1:
            content = {names[0]: next(iter(content.values()))}
        return _split_dict(dict(content), names, batch_size, path)
    raise InputError(
        f"{path} holds a {type(content).__name__}; expected a tensor, a dict of tensors or a list of batches",
        where=str(path),
    )


def _split_dict(content: dict[str, torch.Tensor], names: Sequence[str], batch_size: int, path: Path) -> list[Any]:
    unknown = sorted(set(content) - set(names))
    if unknown:
        raise InputError(
            f"{path} has arrays {', '.join(unknown)} that are not model inputs",
            where=str(path),
            hint=f"model inputs are: {', '.join(names)}",
        )
    sizes = {k: v.shape[0] if v.dim() else 0 for k, v in content.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"{path}: arrays differ in length along dim 0: {sizes}", where=str(path))
    pieces = {k: torch.split(v, batch_size) for k, v in content.items()}
    count = len(next(iter(pieces.values())))
    return [{k: pieces[k][i] for k in content} for i in range(count)]
