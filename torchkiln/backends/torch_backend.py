"""``torch`` backend: the rewritten GraphModule itself — the numeric reference and the fallback.

Saved as the program through ``torch.export``, a flat ATen graph, in :mod:`torch_format`'s files
(``program.json`` + ``program.bin``): dynamic axes are kept (sizes are computed in the graph), and
loading parses JSON and raw tensor bytes — no pickle, nothing that can execute code. The saved
graph is checked against the compiled one on the program's checks when it is first written.

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
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx

from torchkiln.backends import torch_format
from torchkiln.backends.base import Artifact, Backend, BackendOptions, check_device, require_cuda
from torchkiln.compiler import graph as G
from torchkiln.compiler.export import export_graph
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.compiler.verify import FP32, compare
from torchkiln.errors import ArtifactError, BackendError, ExportError, KilnError

FILES = ("program.json", "program.bin")
LEGACY_FILE = "program.pt2"


@dataclasses.dataclass(frozen=True)
class TorchOptions(BackendOptions):
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "compute dtype of floating weights/inputs"
    )
    cuda_graphs: bool = option(False, "capture and replay a CUDA graph per input shape (device cuda only)")

    def validate(self) -> None:
        check_device(self, self.device)
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
        files: tuple[bytes, bytes] | None = None,
        options: TorchOptions | None = None,
    ):
        self.module = module
        self._program = program
        self._files = files
        self.options = options or TorchOptions()
        self._runner: Placed | None = Placed(module, self.options) if self.options.placed else None

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            with torch.no_grad():
                if self._runner is not None:
                    return self._runner(inputs)
                return list(self.module(*inputs))
        except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as exc:
            if isinstance(exc, KilnError):
                raise
            raise BackendError(f"the torch artifact failed: {type(exc).__name__}: {str(exc).strip()[:500]}",
                               hint="check the inputs against the artifact's specs; rebuild it if it was edited") from exc  # fmt: skip

    def saved_form(self) -> tuple[bytes, bytes]:
        """``(program.json, program.bin)``: the program through ``torch.export`` as a flat ATen
        graph, checked against the graph it came from on the program's checks before it is used."""
        if self._files is None:
            assert self._program is not None
            program = self._program
            names = [s.name for s in program.inputs]
            try:
                exported = export_graph(self.module, names, program.example_inputs, program.dynamic_axes)
                try:
                    files = torch_format.dump(functional(G.flat_graph_module(exported.module(), training=False)))
                except torch_format.NotAllowed:  # core ATen, which the allow-list holds whole
                    decomposed = exported.run_decompositions()
                    files = torch_format.dump(functional(G.flat_graph_module(decomposed.module(), training=False)))
            except torch_format.UnsupportedGraph as exc:
                raise ArtifactError(f"cannot save the torch artifact: {exc}", hint="use the onnx backend") from exc
            except Exception as exc:
                raise ExportError(
                    f"torch.export of the rewritten graph failed: {type(exc).__name__}: {exc}"
                ) from exc
            _check_saved_form(torch_format.load(*files, where=FILES[0]), program)
            self._files = files
        return self._files

    def save(self, directory: Path) -> list[str]:
        for name, data in zip(FILES, self.saved_form()):
            (directory / name).write_bytes(data)
        return list(FILES)

    def check_signature(self, inputs: list[str], outputs: int) -> None:
        torch_format.check_signature(self.module, inputs, outputs)

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> TorchArtifact:
        if (directory / LEGACY_FILE).exists() and not (directory / FILES[0]).exists():
            raise ArtifactError(
                f"{LEGACY_FILE} is a torch.export archive, which torchkiln no longer loads: its loader "
                "unpickles, and can execute code",
                where=str(directory / LEGACY_FILE),
                hint="rebuild the artifact with this torchkiln version",
            )
        files = ((directory / FILES[0]).read_bytes(), (directory / FILES[1]).read_bytes())
        module = torch_format.load(*files, where=str(directory / FILES[0]))
        parsed = TorchOptions.from_mapping(options, owner="backend torch")
        require_device(parsed)  # type: ignore[arg-type]
        module.training = False
        return cls(module, files=files, options=parsed)  # type: ignore[arg-type]


def functional(gm: fx.GraphModule) -> fx.GraphModule:
    """Each in-place operator (``relu_``, ``add_``: what ``torch.export`` keeps of an in-place
    module) replaced by its functional twin, and the later uses of the value it wrote redirected to
    the twin's result — the saved graph never writes into a tensor. The result is checked against
    the compiled graph like every saved form."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        written = [a for a in target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if not written:
            continue
        name = target._schema.name.split("::")[-1]
        twin = getattr(getattr(getattr(torch.ops, target.namespace), name[:-1], None), target._overloadname, None)
        if not name.endswith("_") or twin is None or [a.name for a in written] != [target._schema.arguments[0].name]:
            raise torch_format.UnsupportedGraph(f"node '{node.name}' calls {target}, which writes into its input")
        source = node.args[0]
        node.target = twin
        for user in list(source.users) if isinstance(source, fx.Node) else []:
            if user is not node and order[user] > order[node]:
                user.replace_input_with(source, node)
    gm.recompile()
    return gm


def _check_saved_form(saved: fx.GraphModule, program: Program) -> None:
    for check in program.checks:
        with torch.no_grad():
            stats = compare(list(saved(*check.inputs)), program.run(check.inputs), FP32)
        if not stats.within():
            raise ArtifactError(
                f"the graph torch.export produced for saving differs from the compiled one: output "
                f"{stats.worst_output} by max abs {stats.max_abs:.3e}",
                hint="use the onnx backend, and report the model",
            )


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
    require_cuda(options.device, "torch")


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
        self._replaying = threading.Lock()  # a CUDA graph reads and writes fixed buffers: one call at a time

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
        with self._replaying:
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
