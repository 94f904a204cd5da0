"""The backend interface: ``lower(program, options) -> Artifact``.

A backend turns a (rewritten) Program into an :class:`Artifact`: something that runs with torch
tensors in and out using the Program's flat calling convention, saves its files into a directory
and loads back from one. Backends never know which passes ran.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import queue
import re
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch

from torchkiln.compiler.options import Options
from torchkiln.compiler.program import Program
from torchkiln.errors import BackendError


@dataclasses.dataclass(frozen=True)
class BackendOptions(Options):
    """Options of a backend; subclass with option() fields."""


class Artifact(abc.ABC):
    """A loaded or compiled model. :meth:`run` and :meth:`cache_session` may be called from any
    number of threads at once, and each call returns its caller's own outputs: a runtime object that
    serves one call at a time (an infer request, an execution context) comes from a :class:`Pool`."""

    backend: ClassVar[str]

    @abc.abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on flat inputs; return flat outputs (thread-safe, see the class docstring)."""

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


T = TypeVar("T")


class Pool(Generic[T]):
    """Runtime objects that serve one call at a time (an OpenVINO infer request, a TensorRT
    execution context): a call takes an idle one, or makes one when every one is busy, and gives it
    back when done. Concurrent callers never share one; the pool grows to the most calls at once."""

    def __init__(self, make: Callable[[], T]):
        self._make = make
        self._idle: queue.SimpleQueue[T] = queue.SimpleQueue()

    @contextlib.contextmanager
    def taken(self) -> Iterator[T]:
        try:
            item = self._idle.get_nowait()
        except queue.Empty:
            item = self._make()
        try:
            yield item
        finally:
            self._idle.put(item)


class Memo(Generic[T]):
    """Values made once per key on first use (a session rewritten for a cache layout), by one thread
    while any others asking for the same artifact wait."""

    def __init__(self) -> None:
        self._values: dict[Hashable, T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        with self._lock:
            if key not in self._values:
                self._values[key] = make()
            return self._values[key]


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
