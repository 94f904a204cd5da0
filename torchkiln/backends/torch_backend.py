"""``torch`` backend: the rewritten GraphModule itself — the numeric reference and the fallback.

Saved as a ``torch.export`` archive (``program.pt2``), which keeps dynamic axes and loads without
unpickling Python code.

Options place it: ``device=cuda`` runs it on the GPU, ``dtype=float16|bfloat16`` casts its
floating weights and inputs (outputs come back as float32 on the inputs' device), and
``cuda_graphs=true`` captures one CUDA graph per input shape and replays it — the GPU baseline and
fallback for the tensorrt backend. A reduced dtype is lossy: compile with a tolerance
(``Tolerance(min_cosine=...)``). The saved archive is always the float32 graph; the options are
applied again on load.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx

from torchkiln.backends.base import Artifact, Backend, BackendOptions
from torchkiln.compiler import graph as G
from torchkiln.compiler.export import export_graph
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, BackendError, ExportError

FILE = "program.pt2"


@dataclasses.dataclass(frozen=True)
class TorchOptions(BackendOptions):
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "compute dtype of floating weights/inputs"
    )
    cuda_graphs: bool = option(False, "capture and replay a CUDA graph per input shape (device cuda only)")

    def validate(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            self.fail("device", f"must be cpu, cuda or cuda:N, got '{self.device}'")
        if self.cuda_graphs and self.device == "cpu":
            self.fail("cuda_graphs", "needs device=cuda")

    @property
    def placed(self) -> bool:
        return self.device != "cpu" or self.dtype != "float32"


class TorchArtifact(Artifact):
    backend = "torch"

    def __init__(
        self,
        module: fx.GraphModule,
        program: Program | None = None,
        exported: torch.export.ExportedProgram | None = None,
        options: TorchOptions | None = None,
    ):
        self.module = module
        self._program = program
        self._exported = exported
        self.options = options or TorchOptions()
        self._runner: Placed | None = Placed(module, self.options) if self.options.placed else None

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            if self._runner is not None:
                return self._runner(inputs)
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
        parsed = TorchOptions.from_mapping(options, owner="backend torch")
        require_device(parsed)  # type: ignore[arg-type]
        module = G.flat_graph_module(exported.module(), training=False)
        return cls(module, exported=exported, options=parsed)  # type: ignore[arg-type]


class TorchBackend(Backend):
    name = "torch"
    Options = TorchOptions

    def lower(self, program: Program, options: BackendOptions) -> TorchArtifact:
        assert isinstance(options, TorchOptions)
        require_device(options)
        if options.dtype != "float32":
            _refuse_quantized(program.graph_module, options.dtype)
        return TorchArtifact(program.graph_module, program, options=options)

    def load(self, directory: Path, options: BackendOptions) -> TorchArtifact:
        return TorchArtifact.load(directory, options.to_dict())


def require_device(options: TorchOptions) -> None:
    if options.device != "cpu" and not torch.cuda.is_available():
        raise BackendError(
            f"backend option device={options.device}, but torch sees no CUDA device",
            where="backend torch.device",
            hint="use device=cpu, or a machine with an NVIDIA GPU and a CUDA build of torch",
        )


def _refuse_quantized(gm: fx.GraphModule, dtype: str) -> None:
    for node in gm.graph.nodes:
        namespace = getattr(node.target, "namespace", None)
        if node.op == "call_function" and namespace in ("quantized_decomposed", "torchkiln"):
            raise BackendError(
                f"backend option dtype={dtype} on a quantized graph (node '{node.name}'): its int8 ops dequantize "
                "to float32",
                where="backend torch.dtype",
                hint="leave dtype=float32 for quantized graphs; use quantize:mode=fp16/bf16 for a half-precision graph",
            )


class Placed:
    """The graph on another device / in another dtype, optionally through CUDA graphs. The graph
    the artifact was built from is left alone (it is the saved form and the verification reference)."""

    def __init__(self, module: fx.GraphModule, options: TorchOptions):
        self.device = torch.device(options.device)
        self.dtype = getattr(torch, options.dtype)
        self.module = _placed_copy(module, self.device, self.dtype)
        self.graphs: dict[tuple[Any, ...], tuple[Any, list[torch.Tensor], list[torch.Tensor]]] | None = (
            {} if options.cuda_graphs else None
        )

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        args = [self._cast(t.to(self.device)) for t in inputs]
        outputs = self._replay(args) if self.graphs is not None else list(self.module(*args))
        back = inputs[0].device if inputs else torch.device("cpu")
        return [
            o.to(back, torch.float32) if o.dtype == self.dtype and o.is_floating_point() else o.to(back)
            for o in outputs
        ]

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def _replay(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        assert self.graphs is not None
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, static_in, static_out = self.graphs[key]
        for slot, value in zip(static_in, args):
            slot.copy_(value)
        graph.replay()
        return [o.clone() for o in static_out]

    def _capture(self, args: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        static_in = [a.clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up off the capture: lazy init must not be recorded
            for _ in range(3):
                self.module(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = list(self.module(*static_in))
        return graph, static_in, static_out


def _placed_copy(module: fx.GraphModule, device: torch.device, dtype: torch.dtype) -> fx.GraphModule:
    """A copy with floating parameters, buffers and tensor constants cast to ``dtype`` on ``device``
    (integer tensors — int8 weights, indices — only move)."""
    placed = copy.deepcopy(module)

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    placed._apply(move)
    for node in placed.graph.nodes:  # constants fx keeps as plain attributes are not buffers
        if node.op == "get_attr":
            owner_path, _, attr = str(node.target).rpartition(".")
            owner = placed.get_submodule(owner_path) if owner_path else placed
            value = getattr(owner, attr)
            if (
                isinstance(value, torch.Tensor)
                and attr not in owner._buffers
                and attr not in owner._parameters
            ):
                setattr(owner, attr, move(value))
    return placed


BACKEND = TorchBackend()
