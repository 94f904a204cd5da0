"""The backend interface: ``lower(program, options) -> Artifact``.

A backend turns a (rewritten) Program into an :class:`Artifact`: something that runs with torch
tensors in and out using the Program's flat calling convention, saves its files into a directory
and loads back from one. Backends never know which passes ran.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from torchkiln.compiler.options import Options
from torchkiln.compiler.program import Program
from torchkiln.errors import BackendError


@dataclasses.dataclass(frozen=True)
class BackendOptions(Options):
    """Options of a backend; subclass with option() fields."""


class Artifact(abc.ABC):
    backend: ClassVar[str]

    @abc.abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on flat inputs; return flat outputs."""

    @abc.abstractmethod
    def save(self, directory: Path) -> list[str]:
        """Write the artifact's files into ``directory`` (which exists); return their names."""

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> Artifact:
        """Rebuild from files written by :meth:`save`."""

    def file_bytes(self) -> int | None:
        """Size of the deployable file(s), if the artifact has any."""
        return None

    def check_signature(self, inputs: list[str], outputs: int) -> None:
        """Hold a loaded artifact to its manifest before its first call: a backend whose files hold
        a graph checks that it takes ``inputs`` (by name, in order) and returns ``outputs`` tensors."""
        return None

    def notes(self) -> list[str]:
        return []

    def cache_session(
        self, pairs: Sequence[tuple[int, int]], initial: Sequence[torch.Tensor], capacity: int
    ) -> CacheSession | None:
        """A decoder's cache kept inside the runtime from step to step (generation), or None when
        this backend keeps none (the caller then passes the cache in and out on every call).
        ``pairs``: for each cache tensor, the index of its input and of the output that is its next
        value; ``initial``: each one's first value (the prompt's empty cache), in the order of
        ``pairs``; ``capacity``: the most positions the cache will hold in this generation."""
        return None


class CacheSession(abc.ABC):
    """One generation's runs of an artifact whose cache the runtime keeps (:meth:`Artifact.cache_session`)."""

    @abc.abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One step: the artifact's inputs less the cache's, in order → its outputs less the cache's."""


class Backend(abc.ABC):
    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]] = BackendOptions
    #: its artifacts are native code (loading runs it): ``torchkiln.load`` needs ``allow_native_code``
    runs_native_code: ClassVar[bool] = False

    @abc.abstractmethod
    def lower(self, program: Program, options: BackendOptions) -> Artifact:
        """Build an artifact from the program."""

    @abc.abstractmethod
    def load(self, directory: Path, options: BackendOptions) -> Artifact:
        """Load an artifact this backend saved."""


def check_device(options: Options, device: str) -> None:
    """``device`` must be cpu, cuda or cuda:N (an option check: ConfigError)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        options.fail("device", f"must be cpu, cuda or cuda:N, got '{device}'")


def require_cuda(device: str, backend: str) -> None:
    """BackendError when ``device`` is a CUDA device and torch sees none."""
    if device != "cpu" and not torch.cuda.is_available():
        raise BackendError(
            f"backend option device={device}, but torch sees no CUDA device",
            where=f"backend {backend}.device",
            hint="use device=cpu, or a machine with an NVIDIA GPU and a CUDA build of torch",
        )
