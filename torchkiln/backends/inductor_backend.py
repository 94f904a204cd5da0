"""``inductor`` backend: the program compiled ahead of time by AOTInductor into one ``model.pt2``
package — generated C++ (or CUDA) kernels and the weights — that loads with
``torch._inductor.aoti_load_package``: no model source, no retrace, no Python graph at run time.

Lowering: the program goes through ``torch.export`` (dynamic axes kept), torchkiln's own quantized
ops are decomposed into the forms Inductor's quantization lowering matches, and AOTInductor
compiles the result (``freezing`` folds the weights in as constants, which the x86 int8 and bf16
kernels need to pre-pack them). What each IR op becomes:

* static int8 — ``quantize_per_tensor`` (uint8 activations) → ``dequantize_per_tensor`` and
  ``dequantize_per_channel`` on int8 weights — is PT2E's reference form: Inductor turns a conv or
  linear between them into oneDNN's ``qconv`` / ``qlinear`` (VNNI / AMX on x86).
* ``torchkiln::dynamic_linear`` → ``choose_qparams`` + ``quantize_per_tensor.tensor`` +
  ``dequantize_per_tensor.tensor`` on the activation (range ``[min(x, 0), max(x, 0)]``, as the IR's
  kernel) and the per-channel int8 weight: Inductor's dynamic ``qlinear`` pattern.
* ``torchkiln::weight_only_linear`` → its weight unpacked to float (float kernels; the report's
  notes say how many layers).

The report's notes count the layers that run integer kernels (Inductor's pattern counters).
``dtype=bfloat16|float16`` casts the float program's weights and inputs inside the package; outputs
come back as float32 — lossy: compile with a tolerance, e.g. ``Tolerance(min_cosine=0.999)``.

The package records what it was compiled for (``inductor.json``): on CPU the instruction-set
flags its kernels were built with (``-mavx512f`` … ``-mamx-int8`` → cpuinfo flags), on CUDA the
device's compute capability; loading on a machine without them is an ``ArtifactError``, not an
illegal-instruction crash. Loading a package ``dlopen``s the compiled kernels: it runs native
code from the artifact, so ``torchkiln.load`` refuses it unless called with
``allow_native_code=True`` (the manifest's checksums are verified first; the stage cache, trusted
like any cache directory of yours, reloads its own entries).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import fx

from torchkiln.backends.base import Artifact, Backend, BackendOptions, check_device, require_cuda
from torchkiln.compiler import quant_ops
from torchkiln.compiler.export import RECURRENT, export_graph, quiet
from torchkiln.compiler.files import parse_json, remove_private
from torchkiln.compiler.graph import add_attribute, drop_unused_attributes, get_attr_value, module_path
from torchkiln.compiler.machine import cpu_flags, cpu_model, flag_of_compiler_option
from torchkiln.compiler.options import option
from torchkiln.compiler.program import Program
from torchkiln.errors import ArtifactError, BackendError, ExportError

FILES = ("model.pt2", "inductor.json")
FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Inductor's pattern counters that mean "this layer runs an integer kernel"
INTEGER_COUNTERS = {
    "qconv_weight_prepack_matcher_count": "qconv",
    "qlinear_weight_prepack_matcher_count": "qlinear",
    "woq_matcher_count": "int8 weight-only mm",
}


@dataclasses.dataclass(frozen=True)
class InductorOptions(BackendOptions):
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "compute dtype of a float program's weights and inputs (outputs come back as float32)"
    )
    freezing: bool = option(True, "fold the weights into the compiled graph as constants (x86 int8/bf16 kernels need it)")
    max_autotune: bool = option(False, "benchmark kernel choices while compiling (slower build, maybe faster kernels)")

    def validate(self) -> None:
        check_device(self, self.device)


class InductorArtifact(Artifact):
    backend = "inductor"

    def __init__(self, package: bytes, record: dict[str, Any], options: InductorOptions):
        self._package = package
        self.record = record
        self.options = options
        self._names = list(record["inputs"])
        self._dir = Path(tempfile.mkdtemp(prefix="torchkiln-inductor-"))
        weakref.finalize(self, remove_private, self._dir)
        path = self._dir / FILES[0]
        path.write_bytes(package)
        try:
            with quiet():
                self._runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:
            raise ArtifactError(
                f"AOTInductor could not load the package: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                where=FILES[0],
                hint="rebuild the artifact with this torch version on this machine",
            ) from exc
        self._device = torch.device(options.device)
        self._order = _flat_order(self._runner, self._names)

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        device = self._device
        home = inputs[0].device if inputs else torch.device("cpu")
        placed = [t if t.device == device else t.to(device) for t in inputs]
        try:
            with torch.no_grad():
                if self._order is not None:  # the package's own flat call: no pytree per call
                    outputs = self._runner.loader.run([placed[i] for i in self._order])
                else:
                    outputs = self._runner(**dict(zip(self._names, placed)))
        except Exception as exc:
            raise BackendError(
                f"the inductor package failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return [o if o.device == home else o.to(home) for o in outputs]

    def save(self, directory: Path) -> list[str]:
        (directory / FILES[0]).write_bytes(self._package)
        (directory / FILES[1]).write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")
        return list(FILES)

    @classmethod
    def load(cls, directory: Path, options: dict[str, Any]) -> InductorArtifact:
        parsed = InductorOptions.from_mapping(options, owner="backend inductor")
        assert isinstance(parsed, InductorOptions)
        where = str(directory / FILES[1])
        try:
            record = parse_json((directory / FILES[1]).read_text(), where)
            if not isinstance(record, dict) or record.get("format") != FORMAT:
                raise ValueError(f"format {record.get('format') if isinstance(record, dict) else '?'} (expected {FORMAT})")
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"cannot read the inductor record: {exc}", where=where) from exc
        refuse_foreign_machine(record, where)
        return cls((directory / FILES[0]).read_bytes(), record, parsed)

    def file_bytes(self) -> int | None:
        return len(self._package)

    def notes(self) -> list[str]:
        return list(self.record.get("notes", []))


def _flat_order(runner: Any, names: list[str]) -> list[int] | None:
    """Where each of the package's flat inputs is among ``names``, when its calling convention is
    keyword tensors in, a flat tuple of tensors out (what torchkiln exports): then a call can go to
    ``runner.loader.run`` directly, skipping the pytree flatten / unflatten AOTInductor's
    ``__call__`` does each time (~13 us of a ~70 us call of a small MLP). None: use ``__call__``."""
    from torch.utils import _pytree as pytree

    try:
        in_spec, out_spec = (pytree.treespec_loads(spec) for spec in runner.loader.get_call_spec())
        args, kwargs = _children(in_spec)
        keys = list(kwargs.context)
        flat_out = out_spec.type in (tuple, list) and all(c.is_leaf() for c in _children(out_spec))
    except Exception:  # another torch's package layout: the general call still works
        return None
    if args.num_leaves or sorted(keys) != sorted(names) or not flat_out or kwargs.num_leaves != len(keys):
        return None
    return [names.index(key) for key in keys]


def _children(spec: Any) -> list[Any]:
    """A treespec's children: ``children()`` in newer torch, ``children_specs`` before it."""
    children = getattr(spec, "children", None)
    return list(children()) if callable(children) else list(spec.children_specs)


def refuse_foreign_machine(record: dict[str, Any], where: str) -> None:
    """ArtifactError unless this machine has what the package was compiled for."""
    if record.get("device", "cpu") == "cpu":
        have = cpu_flags()
        needed = set(record.get("cpu_flags", []))
        if have is not None and not needed <= have:
            missing = ", ".join(sorted(needed - have))
            raise ArtifactError(
                f"this inductor package was compiled for a CPU with {missing}; this CPU ({cpu_model()}) lacks "
                f"{'it' if len(needed - have) == 1 else 'them'}: its kernels would stop on an illegal instruction",
                where=where,
                hint="rebuild it on this machine (or one like it), or deploy the onnxruntime artifact",
            )
        return
    capability = record.get("cuda_capability")
    if not torch.cuda.is_available():
        raise ArtifactError("this inductor package runs on CUDA, and torch sees no CUDA device", where=where)
    here = ".".join(map(str, torch.cuda.get_device_capability()))
    if capability is not None and capability != here:
        raise ArtifactError(
            f"this inductor package was compiled for CUDA compute capability {capability}; this GPU is {here}",
            where=where,
            hint="rebuild it on this GPU type",
        )


class InductorBackend(Backend):
    name = "inductor"
    Options = InductorOptions
    runs_native_code = True

    def lower(self, program: Program, options: BackendOptions) -> InductorArtifact:
        assert isinstance(options, InductorOptions)
        require_cuda(options.device, "inductor")
        quantized = quantized_layers(program.graph_module)
        total = sum(quantized.values())
        if options.dtype != "float32" and total:
            raise BackendError(
                f"dtype={options.dtype} casts a float program; this one has {total} quantized layers",
                where="backend inductor.dtype",
                hint="use dtype=float32 for a quantized program (its int8 layers run integer kernels)",
            )
        module = cast_program(program.graph_module, DTYPES[options.dtype])
        module, floated = float_single_channel_convs(module) if program.dynamic_axes else (module, [])
        module = module.to(options.device)
        names = [s.name for s in program.inputs]
        example = [t.to(options.device) for t in program.example_inputs]
        try:
            exported = export_graph(module, names, example, program.dynamic_axes)
        except Exception as exc:
            raise ExportError(f"torch.export for inductor failed: {type(exc).__name__}: {exc}") from exc
        refuse_dynamic_recurrence(exported)
        try:
            with quiet():
                exported = exported.run_decompositions(decompositions())
        except Exception as exc:
            raise ExportError(f"torch.export for inductor failed: {type(exc).__name__}: {exc}") from exc
        package, counts = _compile(exported, options)
        record = {
            "format": FORMAT, "inputs": names, "device": "cpu" if options.device == "cpu" else "cuda",
            "dtype": options.dtype, "torch": torch.__version__, **_target(options),
            "notes": _kernel_notes(quantized, counts) + ([
                f"{len(floated)} int8 convolution(s) with one input channel run a float kernel on their dequantized "
                f"weights ({', '.join(floated)}): AOTInductor's int8 kernel for them is wrong with dynamic shapes "
                "(torch 2.13)"] if floated else []),
        }  # fmt: skip
        return InductorArtifact(package, record, options)

    def load(self, directory: Path, options: BackendOptions) -> InductorArtifact:
        return InductorArtifact.load(directory, options.to_dict())


def refuse_dynamic_recurrence(exported: torch.export.ExportedProgram) -> None:
    """An LSTM / GRU / RNN over a dynamic sequence axis is refused by name: Inductor unrolls the
    recurrence over the traced length, so the package computed wrong outputs at every other length
    (an LSTM feeding a GRU: 7e-2 off at the example itself, caught only by verification)."""
    for node in exported.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "_opname", None) not in RECURRENT:
            continue
        shape = getattr(node.args[0].meta.get("val"), "shape", ())
        axis = 1 if node.args[8] else 0  # batch_first
        if len(shape) > axis and not isinstance(shape[axis], int):
            raise ExportError(
                f"the inductor backend cannot run '{node.name}' ({node.target}) over a dynamic sequence axis: "
                "AOTInductor unrolls the recurrence over the traced length (torch 2.13)",
                where=node.name,
                hint="make the sequence axis static, or use backend onnxruntime, openvino or torch (they keep it dynamic)",
            )


def _compile(exported: torch.export.ExportedProgram, options: InductorOptions) -> tuple[bytes, dict[str, int]]:
    """AOTInductor on ``exported``: the package's bytes and Inductor's integer-pattern counters."""
    from torch._dynamo.utils import counters

    configs = {"freezing": options.freezing, "max_autotune": options.max_autotune}
    with tempfile.TemporaryDirectory(prefix="torchkiln-aoti-") as work:
        before = dict(counters["inductor"])
        try:
            with quiet(), torch.no_grad():
                path = torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(Path(work) / FILES[0]), inductor_configs=configs
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise BackendError(
                f"AOTInductor failed to compile the program: {type(exc).__name__}: {first}",
                hint="needs a C++ compiler (g++) on CPU and a CUDA toolkit on GPU; or use backend onnxruntime",
            ) from exc
        counts = {k: counters["inductor"][k] - before.get(k, 0) for k in INTEGER_COUNTERS}
        return Path(path).read_bytes(), counts


def _target(options: InductorOptions) -> dict[str, Any]:
    """What the kernels need from the machine: CPU instruction-set flags, or the CUDA capability."""
    if options.device != "cpu":
        return {"cuda_capability": ".".join(map(str, torch.cuda.get_device_capability(options.device)))}
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    flags = sorted({flag_of_compiler_option(f) for f in isa.build_arch_flags().split() if f.startswith("-m")})
    return {"cpu": cpu_model(), "vector_isa": str(isa), "cpu_flags": flags}


def quantized_layers(gm: fx.GraphModule) -> dict[str, int]:
    """How many layers of each quantized form the IR holds."""
    kinds = {
        quant_ops.DEQUANTIZE_CHANNEL: "static int8",
        torch.ops.torchkiln.dynamic_linear.default: "dynamic int8",
        torch.ops.torchkiln.weight_only_linear.default: "weight-only",
        torch.ops.torchkiln.weight_only_linear_zp.default: "weight-only",
        torch.ops.torchkiln.grouped_weight_only_mm.default: "weight-only",
        torch.ops.torchkiln.grouped_dynamic_mm.default: "dynamic int8",
    }
    counts: dict[str, int] = {kind: 0 for kind in kinds.values()}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in kinds:
            counts[kinds[node.target]] += 1
    return counts


def _kernel_notes(quantized: dict[str, int], counts: dict[str, int]) -> list[str]:
    integer = sum(counts.values())
    wanted = quantized["static int8"] + quantized["dynamic int8"]
    notes = []
    if wanted or integer:
        detail = ", ".join(f"{INTEGER_COUNTERS[k]} {v}" for k, v in counts.items() if v)
        notes.append(f"integer kernels: {integer} of {wanted} int8 layers ({detail or 'none matched'})")
        if integer < wanted:
            notes.append(
                f"{wanted - integer} int8 layer(s) run float kernels on dequantized values "
                "(Inductor matched no integer pattern for them)"
            )
    if quantized["weight-only"]:
        notes.append(f"{quantized['weight-only']} weight-only layer(s) run float kernels (weights unpacked)")
    return notes


def cast_program(gm: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """``gm`` itself for float32; else a copy with floating weights in ``dtype``, floating inputs
    cast to it on entry and floating outputs cast back to float32."""
    if dtype == torch.float32:
        return gm
    cast = copy.deepcopy(gm).to(dtype)
    graph = cast.graph
    for node in list(graph.nodes):
        if node.op == "placeholder" and _floating(node):
            with graph.inserting_after(node):
                converted = graph.call_method("to", (node, dtype))
            node.replace_all_uses_with(converted, delete_user_cb=lambda user, c=converted: user is not c)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        values = [graph.call_method("float", (v,)) if _floating(v) else v for v in output.args[0]]
    output.args = (type(output.args[0])(values),)
    graph.lint()
    cast.recompile()
    return cast


def float_single_channel_convs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose static-int8 convolutions with one input channel (``groups=1``) take
    their weight dequantized ahead of time, as a float constant, and their module paths. Numerically the
    same program — the weight was dequantized at run time anyway — but Inductor then matches no
    integer pattern for them: its AOT int8 convolution over one input channel returns wrong values
    once a dimension is dynamic (torch 2.13: cosine 0.01 against eager on a lone 1→8 conv; two or
    more input channels, and static shapes, are right)."""
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (torch.ops.aten.conv2d.default,
             torch.ops.aten.conv1d.default) and len(n.args) > 1 and getattr(n.args[1], "target", None)
             == quant_ops.DEQUANTIZE_CHANNEL and n.args[1].args[0].op == "get_attr"]  # fmt: skip
    single = [n for n in convs if (n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)) == 1
              and get_attr_value(gm, str(n.args[1].args[0].target)).shape[1] == 1]  # fmt: skip
    if not single:
        return gm, []
    copied = copy.deepcopy(gm)
    nodes = {n.name: n for n in copied.graph.nodes}
    for conv in single:
        dequantize = nodes[conv.args[1].name]
        weight = dequantize.target(*(get_attr_value(copied, str(a.target)) if isinstance(a, fx.Node) else a
                                     for a in dequantize.args))  # fmt: skip
        with copied.graph.inserting_before(dequantize):
            constant = copied.graph.get_attr(add_attribute(copied, f"{conv.name}_float_weight", weight, parameter=False))
        constant.meta = dict(dequantize.meta)
        dequantize.replace_all_uses_with(constant)
        copied.graph.erase_node(dequantize)
    copied.graph.eliminate_dead_code()
    drop_unused_attributes(copied)  # the int8 weight, scales and zero points those convs no longer read
    copied.graph.lint()
    copied.recompile()
    return copied, [module_path(n) for n in single]


def _floating(node: Any) -> bool:
    value = node.meta.get("val", node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None
    dtype = getattr(value, "dtype", None)
    return dtype is None or dtype.is_floating_point


def decompositions() -> dict[Any, Any]:
    """torchkiln's custom quantized ops as ATen / ``quantized_decomposed`` ops (see module doc)."""
    decomposed = torch.ops.quantized_decomposed

    def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x_scale, x_zero = decomposed.choose_qparams.tensor(x, 0, 255, torch.finfo(torch.float32).eps, torch.uint8)
        xq = decomposed.quantize_per_tensor.tensor(x, x_scale, x_zero, 0, 255, torch.uint8)
        xdq = decomposed.dequantize_per_tensor.tensor(xq, x_scale, x_zero, 0, 255, torch.uint8)
        zeros = torch.zeros_like(scale, dtype=torch.int64)
        w = decomposed.dequantize_per_channel.default(weight, scale, zeros, 0, -128, 127, torch.int8)
        return torch.nn.functional.linear(xdq, w, bias if bias.numel() == weight.shape[0] else None)

    def weight_only_linear(
        x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor, bits: int, block_size: int
    ) -> torch.Tensor:
        weight = quant_ops.unpack_blocks(packed, scales, bits, block_size, x.shape[-1]).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias if bias.numel() == packed.shape[0] else None)

    def weight_only_linear_zp(
        x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor,
        bits: int, block_size: int,
    ) -> torch.Tensor:  # fmt: skip
        weight = quant_ops.unpack_blocks(packed, scales, bits, block_size, x.shape[-1], zeros).to(x.dtype)
        return torch.nn.functional.linear(x, weight, bias if bias.numel() == packed.shape[0] else None)

    table = {
        torch.ops.torchkiln.dynamic_linear.default: dynamic_linear,
        torch.ops.torchkiln.weight_only_linear.default: weight_only_linear,
        torch.ops.torchkiln.weight_only_linear_zp.default: weight_only_linear_zp,
    }
    grouped = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    if grouped is not None:  # a mixture of experts' quantized grouped matmul: the experts unpacked to float

        def grouped_weight_only_mm(
            x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, bits: int, block_size: int
        ) -> torch.Tensor:
            weights = [
                quant_ops.unpack_blocks(packed[e], scales[e], bits, block_size, x.shape[-1]).t()
                for e in range(packed.shape[0])
            ]
            return grouped.default(x, torch.stack(weights).to(x.dtype), offsets)

        def grouped_dynamic_mm(
            x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offsets: torch.Tensor
        ) -> torch.Tensor:
            """Each row fake-quantized with its expert's range (a segment min / max over the rows
            the offsets give that expert), then the float grouped matmul on the dequantized
            experts: what the reference computes, per expert."""
            rows = torch.arange(x.shape[0], device=x.device)
            expert = torch.searchsorted(offsets.to(torch.int64), rows, right=True).clamp(max=weight.shape[0] - 1)
            lows = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
            highs = torch.zeros(weight.shape[0], dtype=x.dtype, device=x.device)
            lows = lows.scatter_reduce(0, expert, x.amin(-1), "amin", include_self=True)
            highs = highs.scatter_reduce(0, expert, x.amax(-1), "amax", include_self=True)
            low, high = lows[expert][:, None], highs[expert][:, None]
            step = (high - low) / 255.0
            step = torch.where(step > 0, step, torch.ones_like(step))
            zero = torch.clamp(torch.round(-low / step), 0, 255)
            xq = (torch.clamp(torch.round(x / step) + zero, 0, 255) - zero) * step
            weights = (weight.to(x.dtype) * scale.to(x.dtype)[..., None]).transpose(1, 2)
            return grouped.default(xq, weights.contiguous(), offsets)

        table[torch.ops.torchkiln.grouped_weight_only_mm.default] = grouped_weight_only_mm
        table[torch.ops.torchkiln.grouped_dynamic_mm.default] = grouped_dynamic_mm
    return table


BACKEND = InductorBackend()
