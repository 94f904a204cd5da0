"""``torch`` backend: the rewritten GraphModule itself — the numeric reference and the fallback.

Saved as a ``torch.export`` archive (``program.pt2``), which keeps dynamic axes and loads without
unpickling Python code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from torchkiln.backends.base import Artifact, Backend, BackendOptions
from torchkiln.compiler import graph as G
from torchkiln.compiler.export import export_graph
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, ExportError

FILE = "program.pt2"


@dataclasses.dataclass(frozen=True)
class TorchOptions(BackendOptions):
    pass


class TorchArtifact(Artifact):
    backend = "torch"

    def __init__(
        self,
        module: fx.GraphModule,
        program: Program | None = None,
        exported: torch.export.ExportedProgram | None = None,
    ):
        self.module = module
        self._program = program
        self._exported = exported

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.module(*inputs))

    def exported_program(self) -> torch.export.ExportedProgram:
        if self._exported is None:
            assert self._program is not None
            program = self._program
            names = [s.name for s in program.inputs]
            try:
                self._exported = export_graph(
                    self.module, names, program.example_inputs, program.dynamic_axes
                )
            except Exception as exc:
                raise ExportError(
                    f"torch.export of the rewritten graph failed: {type(exc).__name__}: {exc}"
                ) from exc
        return self._exported

    def save(self, directory: Path) -> list[str]:
        torch.export.save(self.exported_program(), directory / FILE)
        return [FILE]

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> TorchArtifact:
        import torchkiln.compiler.quant_ops  # noqa: F401 - a quantized program calls these ops

        try:
            exported = torch.export.load(directory / FILE)
        except Exception as exc:
            raise ArtifactError(
                f"cannot load {FILE}: {type(exc).__name__}: {exc}", where=str(directory / FILE)
            ) from exc
        return cls(G.flat_graph_module(exported.module(), training=False), exported=exported)


class TorchBackend(Backend):
    name = "torch"
    Options = TorchOptions

    def lower(self, program: Program, options: BackendOptions) -> TorchArtifact:
        return TorchArtifact(program.graph_module, program)

    def load(self, directory: Path, options: BackendOptions) -> TorchArtifact:
        return TorchArtifact.load(directory, options.to_dict())


BACKEND = TorchBackend()
