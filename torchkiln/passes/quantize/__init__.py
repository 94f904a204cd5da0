"""``quantize``: static int8 PTQ, dynamic int8, weight-only int8/int4, fp16 / bf16.

Modes (``quantize:mode=...``):

* ``int8`` (static): activation ranges calibrated on ``compile(..., calibration_data=...)``;
  Q/DQ placed where runtimes fuse them into integer kernels (:mod:`.static`); ``smoothquant``
  migrates activation outliers into the weights first (:mod:`.smoothquant`).
* ``dynamic``: Linear layers with int8 weights, activations quantized per call (:mod:`.linear`).
* ``weight_only``: Linear weights in ``bits`` = 8, 4 or 3 with a scale (and with ``symmetric=false`` a
  zero point) per ``block_size`` inputs; the integers rounded to nearest, or chosen with calibration
  data by GPTQ (:mod:`.gptq`) or AWQ (:mod:`.awq`).
* ``fp16`` / ``bf16``: low-precision compute, ``keep_fp32`` ops and fp32 I/O (:mod:`.half`).

Layers named in ``ignore`` (module paths, ``*`` globs) or with fewer than ``min_macs``
multiply-accumulates stay in float. With ``max_error`` (relative RMS error of the outputs on the
calibration batches) the most sensitive layers stay in float until the error fits; ``sensitivity``
reports the ranked per-layer table (:mod:`.sensitivity`). Every layer left in float gets a note.

The pass works on a copy of the graph and swaps it in at the end, so a failure leaves the
program untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import fx

import torchkiln.compiler.quant_ops  # noqa: F401 - registers the quantized IR ops
from torchkiln.compiler import graph as G
from torchkiln.compiler.calibration import no_progress
from torchkiln.compiler.machine import int8_saturates
from torchkiln.compiler.options import option
from torchkiln.compiler.passes import Pass, PassConfig, PassResult, register_pass
from torchkiln.compiler.program import Program
from torchkiln.compiler.ranks import join_process_group
from torchkiln.compiler.verify import Tolerance
from torchkiln.errors import ConfigError, InputError
from torchkiln.passes.distill import DistillConfig, train_graph
from torchkiln.passes.layers import Layer, find_layers, find_layers_and_skips, ignored, weight_ops
from torchkiln.passes.quantize import awq, coverage, gptq, half, linear, qat, sensitivity, smoothquant, static

Mode = Literal["int8", "dynamic", "weight_only", "fp16", "bf16"]
_INTEGER = ("int8", "dynamic", "weight_only")
_STATIC = ("int8",)
_HALF = ("fp16", "bf16")
# Options that mean something only in some modes: setting one elsewhere is a mistake, not a no-op.
_MODES_OF = {
    "calibrator": _STATIC, "percentile": _STATIC, "calibration_batches": ("int8", "weight_only"), "target": _STATIC,
    "op_types": _STATIC, "max_error": _STATIC, "sensitivity": _STATIC, "sensitivity_batches": _STATIC,
    "reduce_range": ("int8", "dynamic"), "bits": ("weight_only",), "block_size": ("weight_only",),
    "method": ("weight_only",), "damp": ("weight_only",), "symmetric": ("weight_only",),
    "act_order": ("weight_only",), "awq_grid": ("weight_only",), "smoothquant": _STATIC,
    "qat_epochs": ("dynamic", "weight_only"), "qat_lr": ("dynamic", "weight_only"),
    "ignore": _INTEGER, "min_macs": _INTEGER, "min_cosine": _INTEGER, "keep_fp32": _HALF, "fp32_io": _HALF,
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    mode: Mode = option("int8", "int8 (static, calibrated), dynamic, weight_only, fp16 or bf16")
    calibrator: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "minmax", "how activation ranges are chosen from the calibration histograms"
    )
    percentile: float = option(99.99, "percentile calibrator: the percentile kept inside the range")
    calibration_batches: int = option(0, "use at most this many calibration batches (0 = all)")
    target: Literal["onnxruntime", "tensorrt"] = option(
        "onnxruntime", "activation format: uint8 asymmetric (onnxruntime) or int8 symmetric (tensorrt)"
    )
    reduce_range: Literal["auto", "on", "off"] = option(
        "auto", "7-bit weights (x86 without VNNI saturates 8-bit); auto = on for dynamic, and for int8 "
        "(target onnxruntime) when the building CPU lacks VNNI/AMX"
    )
    smoothquant: Literal["off", "auto"] | float = option(
        "off", "int8: SmoothQuant before calibration: migration strength alpha in (0, 1] (0.5 in the paper), "
        "or auto (searched per input group); off = none"
    )
    op_types: tuple[Literal["conv", "linear", "matmul"], ...] = option(
        ("conv", "linear", "matmul"), "layer kinds to quantize (int8 mode)"
    )
    ignore: tuple[str, ...] = option((), "module paths (globs) to keep in float, e.g. stem.*|head")
    min_macs: int = option(0, "keep layers with fewer multiply-accumulates than this in float")
    max_error: float | None = option(None, "error budget (relative RMS of outputs): keep sensitive layers in float")
    sensitivity: bool = option(False, "measure and report each layer's sensitivity (SQNR when alone)")
    sensitivity_batches: int = option(4, "calibration batches used to measure sensitivity and error")
    min_cosine: float = option(0.99, "promise checked against eager: output cosine similarity floor")
    bits: Literal[3, 4, 8] = option(4, "weight_only: bits per weight (3: 3-bit values stored in 4-bit codes)")
    block_size: int = option(32, "weight_only: inputs sharing one scale (a power of 2, >= 16)")
    symmetric: bool = option(
        True, "weight_only: a grid symmetric about 0 per block (false: the block's min..max with a stored zero point)"
    )
    method: Literal["rtn", "gptq", "awq"] = option(
        "rtn", "weight_only: how the integers are chosen: rtn (round to nearest), gptq (calibrated: each "
        "column's rounding error spread over the rest by the inputs' Hessian) or awq (calibrated: salient input "
        "channels scaled up before rounding, the inverse folded into the op before)"
    )
    damp: float = option(0.01, "gptq: dampening added to the Hessian's diagonal, as a fraction of its mean")
    act_order: bool = option(False, "gptq: quantize columns in order of decreasing Hessian diagonal")
    awq_grid: int = option(20, "awq: migration strengths tried per layer group (alpha = 0, 1/n, ..., (n-1)/n)")
    qat_epochs: int = option(
        0, "dynamic / weight_only: first fine-tune toward the eager model through the weights' quantization "
        "(straight-through estimator) for this many epochs on compile(train_data=...); 0 = none"
    )
    qat_lr: float = option(1e-5, "qat: peak learning rate (AdamW, cosine schedule)")
    keep_fp32: tuple[str, ...] = option(
        half.DEFAULT_KEEP_FP32, "fp16/bf16: ops that stay in float32 (router: a mixture of experts' scoring and topk)"
    )
    fp32_io: bool = option(True, "fp16/bf16: keep float32 inputs and outputs")

    def validate(self) -> None:
        for key in self.changed():
            if key in _MODES_OF and self.mode not in _MODES_OF[key]:
                self.fail(key, f"applies to mode={'|'.join(_MODES_OF[key])} only, not mode={self.mode}")
        if not 50.0 < self.percentile <= 100.0:
            self.fail("percentile", f"must be in (50, 100], got {self.percentile}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            self.fail("block_size", f"must be a power of 2 and at least 16, got {self.block_size}")
        if self.max_error is not None and self.max_error <= 0:
            self.fail("max_error", f"must be > 0, got {self.max_error}")
        if not 0.0 < self.min_cosine <= 1.0:
            self.fail("min_cosine", f"must be in (0, 1], got {self.min_cosine}")
        for key in ("calibration_batches", "min_macs"):
            if getattr(self, key) < 0:
                self.fail(key, f"must be >= 0, got {getattr(self, key)}")
        needs = {"damp": "gptq", "act_order": "gptq", "awq_grid": "awq"}
        for key in self.changed():
            if key in needs and self.method != needs[key]:
                self.fail(key, f"applies to method={needs[key]} only, not method={self.method}")
        if "calibration_batches" in self.changed() and self.mode == "weight_only" and self.method == "rtn":
            self.fail("calibration_batches", "method=rtn uses no calibration data (method=gptq or awq does)")
        if isinstance(self.smoothquant, float) and not 0.0 < self.smoothquant <= 1.0:
            self.fail("smoothquant", f"must be off, auto or in (0, 1], got {self.smoothquant}")
        if self.qat_epochs < 0:
            self.fail("qat_epochs", f"must be >= 0, got {self.qat_epochs}")
        if self.qat_epochs and self.method != "rtn":
            self.fail("qat_epochs", f"trains toward round to nearest's grid; method={self.method} would re-choose the integers")
        if not 0.0 < self.qat_lr <= 1.0:
            self.fail("qat_lr", f"must be in (0, 1], got {self.qat_lr}")
        if not 2 <= self.awq_grid <= 100:
            self.fail("awq_grid", f"must be in [2, 100], got {self.awq_grid}")
        if not 0.0 < self.damp <= 1.0:
            self.fail("damp", f"must be in (0, 1], got {self.damp}")
        if self.sensitivity_batches < 1:
            self.fail("sensitivity_batches", f"must be >= 1, got {self.sensitivity_batches}")


@register_pass
class Quantize(Pass):
    """Quantize to int8 (static or dynamic), int8/int4 weights only, or fp16/bf16."""

    name = "quantize"
    Config = QuantizeConfig
    lossless = False
    config: QuantizeConfig

    def tolerance(self) -> Tolerance:
        if self.config.mode in ("fp16", "bf16"):
            return Tolerance(atol=1e-3, rtol=1e-2 if self.config.mode == "fp16" else 5e-2)
        return Tolerance(min_cosine=self.config.min_cosine)

    def run(self, program: Program) -> PassResult:
        work = copy.deepcopy(program.graph_module)
        if self.config.mode in ("fp16", "bf16"):
            result = self._half(work, program)
        else:
            result = self._integer(work, program)
        if result.modified:
            program.graph_module = work
        return result

    def _half(self, gm: fx.GraphModule, program: Program) -> PassResult:
        dtype = torch.float16 if self.config.mode == "fp16" else torch.bfloat16
        low, kept = half.convert(gm, dtype, self.config.keep_fp32, program.example_inputs, self.config.fp32_io)
        return PassResult(modified=low > 0, stats={f"{self.config.mode}_ops": low, "fp32_ops": kept})

    def _integer(self, gm: fx.GraphModule, program: Program) -> PassResult:
        layers, skipped = find_layers_and_skips(gm)
        census = weight_ops(gm)  # before the rewrite replaces the nodes
        G.annotate(gm, program.example_inputs)  # the canonical nodes' dtypes guide placement
        notes: list[str] = []
        chosen, float_reasons = self._select(layers)
        experts = self._experts(gm, census)
        if chosen and self.config.qat_epochs:
            notes.extend(self._qat(gm, program, chosen))
        if chosen and self.config.mode == "dynamic":
            linear.quantize_dynamic(gm, chosen, self.config.reduce_range != "off")
        elif chosen and self.config.mode == "weight_only":
            self._weight_only(gm, program, chosen, notes)
        elif chosen:
            chosen = self._static(gm, program, chosen, notes, float_reasons)
        done = [node for node, why in experts.items() if why is None]
        if done:
            bits = self.config.bits if self.config.mode == "weight_only" else None  # None: dynamic int8
            if bits is not None and (self.config.method != "rtn" or not self.config.symmetric):
                notes.append(f"{len(done)} expert matmul(s): round to nearest on a symmetric grid "
                             f"({self.config.method.upper()} and zero points cover Linear layers)")
            linear.quantize_expert_weights(gm, done, bits, self.config.block_size, self.config.reduce_range != "off")
        stats, accounting = coverage.account(
            census, layers, chosen, float_reasons, skipped, self.config.mode, experts
        )  # fmt: skip
        chosen = chosen or done  # type: ignore[assignment]
        notes = accounting + notes
        if not chosen:
            notes.append("no layer to quantize: nothing changed")
        return PassResult(modified=bool(chosen), stats=stats, notes=notes)

    def _experts(self, gm: fx.GraphModule, census: list[Any]) -> dict[fx.Node, str | None]:
        """Each mixture-of-experts grouped matmul: None where this run quantizes its experts'
        weights (weight-only), else why they stay in float."""
        result: dict[fx.Node, str | None] = {}
        for op in census:
            if op.kind != "experts":
                continue
            if self.config.mode not in ("weight_only", "dynamic"):
                result[op.node] = coverage.EXPERTS.format(mode=self.config.mode)
            elif any(fnmatch.fnmatchcase(op.name, pattern) for pattern in self.config.ignore):
                result[op.node] = "named in ignore"
            elif linear.expert_weight(gm, op.node) is None:
                result[op.node] = "its experts' weights are not one stored tensor (run cleanup first)"
            else:
                result[op.node] = None
        return result

    def _select(self, layers: list[Layer]) -> tuple[list[Layer], dict[str, str]]:
        """The layers to quantize, and why each other one stays in float (by key)."""
        chosen, reasons = [], {}
        kinds = self.config.op_types if self.config.mode == "int8" else ("linear",)
        for layer in layers:
            why = self._why_float(layer, kinds)
            if why is None:
                chosen.append(layer)
            else:
                reasons[layer.key] = why
        return chosen, reasons

    def _why_float(self, layer: Layer, kinds: tuple[str, ...]) -> str | None:
        if ignored(layer, self.config.ignore):
            return "named in ignore"
        if layer.kind not in kinds:
            return f"{layer.kind} layers are not quantized in mode={self.config.mode}"
        if layer.kind != "matmul" and layer.weight is None:
            return "its weight is not a stored tensor"
        if layer.macs < self.config.min_macs:
            return f"{layer.macs:,} MACs is below min_macs={self.config.min_macs:,}"
        return None

    def _static(
        self, gm: fx.GraphModule, program: Program, chosen: list[Layer], notes: list[str], reasons: dict[str, str]
    ) -> list[Layer]:
        signed = self.config.target == "tensorrt"
        levels = 63 if self._seven_bit(signed) else 127
        kept: list[tuple[torch.Tensor, ...]] = []
        if self.config.smoothquant != "off":  # one more pass over the data, before the ranges
            source = program.calibration.source if program.calibration is not None else None
            if source is not None and iter(source) is source:
                raise InputError(
                    "quantize smoothquant reads the calibration data twice, and it is a one-shot iterator",
                    where="quantize", hint="pass a list of batches (or a re-iterable such as a DataLoader)",
                )  # fmt: skip
            alpha = None if self.config.smoothquant == "auto" else float(self.config.smoothquant)
            linears = [layer for layer in chosen if layer.kind == "linear"]
            notes.extend(smoothquant.smooth(gm, linears, self._calibration_batches(program, [], itertools.count(1)),
                                            alpha, signed, *join_process_group()))  # fmt: skip
        seen = itertools.count(1)
        batches = self._calibration_batches(program, kept, seen)
        observed = static.plan(gm, chosen)
        # every planned tensor, not just scale sources: a subset of layers (mixed precision) can
        # leave a pass-through op without its source and then it needs its own range
        histograms = static.calibrate(gm, set(observed), batches, *join_process_group())
        qparams = static.qparams_for(histograms, self.config.calibrator, self.config.percentile, signed)

        def quantize(graph: fx.GraphModule, layers: Sequence[Layer]) -> None:
            static.apply(graph, layers, qparams, levels)

        if self.config.max_error is not None or self.config.sensitivity:
            chosen = self._mixed_precision(gm, chosen, kept, quantize, notes, reasons)
        keys = {layer.key for layer in chosen}
        quantize(gm, [layer for layer in find_layers(gm)[0] if layer.key in keys])
        notes.append(
            f"calibrated {len(histograms)} tensors on {next(seen) - 1} batches with {self.config.calibrator}; "
            f"activations {'int8 symmetric' if signed else 'uint8 asymmetric'}, weights int8 per channel"
            + self._weight_grid_note(levels, signed)
        )
        return chosen

    def _weight_grid_note(self, levels: int, signed: bool) -> str:
        if levels == 63:
            return (" (7-bit: this CPU has no VNNI/AMX, and its kernels would saturate 8-bit ones; reduce_range=auto)"
                    if self.config.reduce_range == "auto" else " (7-bit: reduce_range=on)")
        if signed:
            return ""
        return (" (8-bit: on an x86 CPU without VNNI/AMX these saturate; to deploy on one, build with "
                "reduce_range=on)")

    def _seven_bit(self, signed: bool) -> bool:
        """Static int8's weight grid: ±63 when asked, or (auto) when ONNX Runtime's / oneDNN's u8×s8
        kernels on this CPU would saturate a 16-bit sum of two 8-bit products (x86 without VNNI)."""
        if self.config.reduce_range != "auto":
            return self.config.reduce_range == "on"
        return not signed and int8_saturates()

    def _qat(self, gm: fx.GraphModule, program: Program, chosen: list[Layer]) -> list[str]:
        """Fine-tune ``gm`` through the chosen layers' weight quantization (:mod:`.qat`)."""
        config = self.config
        grid = (qat.per_channel(63 if config.reduce_range != "off" else 127) if config.mode == "dynamic"
                else awq.Grid(config.bits, config.block_size, config.symmetric).round_trip)  # fmt: skip
        with qat.fake_quantized(gm, chosen, grid):
            result = train_graph(program, gm, DistillConfig(epochs=config.qat_epochs, lr=config.qat_lr, temperature=1.0),
                                 "quantize qat")  # temperature 1: the output distribution itself, as LLM QAT does
        return [f"quantization-aware fine-tune of {len(chosen)} layer(s), {len(result.history)} epoch(s), best "
                f"{result.best_epoch + 1}: " + ", ".join(f"train loss {h['train_loss']:.4f}" for h in result.history)]

    def _weight_only(self, gm: fx.GraphModule, program: Program, chosen: list[Layer], notes: list[str]) -> None:
        config = self.config
        _check_block_size(gm, chosen, config.block_size)
        grid = f"int{config.bits}" + (" (in 4-bit codes)" if config.bits == 3 else "") + (
            ", symmetric" if config.symmetric else ", asymmetric (zero point per block)")
        notes.append(f"weights {grid}, blocks of {config.block_size} inputs")
        choose = None
        if config.method == "gptq":
            found = self._gptq_hessians(gm, program, chosen, notes)

            def choose(layer: Layer, weight: torch.Tensor) -> Any:
                hessian = found.get(layer.node.name)
                return None if hessian is None else gptq.quantize(
                    weight, hessian, config.bits, config.block_size, config.damp, config.symmetric, config.act_order)
        elif config.method == "awq":
            batches = self._calibration_batches(program, [], itertools.count(1))
            notes.extend(awq.scale(gm, chosen, batches, awq.Grid(config.bits, config.block_size, config.symmetric),
                                   config.awq_grid, *join_process_group()))  # fmt: skip
        progress = program.progress or no_progress
        layers = progress(chosen, len(chosen), config.method.upper()) if config.method == "gptq" else chosen
        linear.quantize_weights(gm, layers, config.bits, config.block_size, config.symmetric, choose)

    def _gptq_hessians(
        self, gm: fx.GraphModule, program: Program, chosen: list[Layer], notes: list[str]
    ) -> dict[str, torch.Tensor]:
        """Each chosen layer's input Hessian from one float pass over the calibration data; a layer
        the data never reaches stays round-to-nearest, and the notes say which."""
        batches = self._calibration_batches(program, [], itertools.count(1))
        found, rows = gptq.hessians(gm, [layer.node for layer in chosen], batches, *join_process_group())
        missed = [layer.name for layer in chosen if layer.node.name not in found]
        # fewer rows than inputs: a singular Hessian, which GPTQ would overfit (gptq module docstring)
        few = {layer.name: (rows[layer.node.name], found[layer.node.name].shape[0]) for layer in chosen
               if layer.node.name in found and rows[layer.node.name] < found[layer.node.name].shape[0]}  # fmt: skip
        kept = {name: h for name, h in found.items() if rows[name] >= h.shape[0]}
        notes.append(
            f"GPTQ (damp {self.config.damp}{', act order' if self.config.act_order else ''}) on {len(kept)} of "
            f"{len(chosen)} layer(s)"
            + (f"; round to nearest (no calibration input reached them): {', '.join(missed)}" if missed else "")
            + ("; round to nearest (fewer calibration rows than inputs — give more calibration data): "
               + ", ".join(f"{name} ({n} < {k})" for name, (n, k) in few.items()) if few else "")
        )
        return kept

    def _calibration_batches(
        self, program: Program, kept: list[tuple[torch.Tensor, ...]], seen: Iterator[int]
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        if program.calibration is None:
            what = "mode=int8" if self.config.mode == "int8" else f"method={self.config.method}"
            raise InputError(
                f"quantize {what} needs calibration data",
                where="quantize",
                hint="pass calibration_data=[...] to torchkiln.compile (kiln: --calibration FILE|random:N), "
                + ("or use mode=dynamic / weight_only, which need none" if self.config.mode == "int8"
                   else "or method=rtn (round to nearest), which needs none"),
            )
        limit = self.config.calibration_batches or None
        progress = program.progress or no_progress
        total = program.calibration.total()
        total = min(total, limit) if total is not None and limit else (limit or total)
        for batch in progress(itertools.islice(program.calibration, limit), total, "calibrating"):
            if len(kept) < self.config.sensitivity_batches:
                kept.append(batch)
            next(seen)
            yield batch

    def _mixed_precision(
        self,
        gm: fx.GraphModule,
        chosen: list[Layer],
        batches: list[tuple[torch.Tensor, ...]],
        quantize: sensitivity.Quantizer,
        notes: list[str],
        reasons: dict[str, str],
    ) -> list[Layer]:
        evaluator = sensitivity.Evaluator(gm, batches, quantize)
        ranked = sensitivity.rank(evaluator, chosen)
        notes.append("sensitivity (error when only this layer is int8), most sensitive first:")
        notes.extend(f"  {layer.name}: SQNR {sensitivity.sqnr_db(err):.1f} dB" for layer, err in ranked)
        if self.config.max_error is None:
            return chosen
        quantized, kept, error = sensitivity.fit_budget(evaluator, ranked, self.config.max_error)
        for layer in kept:
            reasons[layer.key] = f"most sensitive remaining layer (max_error={self.config.max_error:g})"
        verdict = "within" if error <= self.config.max_error else "ABOVE"
        notes.append(f"error with {len(quantized)} int8 layers: {error:.4f} ({verdict} max_error={self.config.max_error:g})")
        return quantized


def _check_block_size(gm: fx.GraphModule, chosen: list[Layer], block_size: int) -> None:
    """A block wider than every layer pads each weight row to ``block_size`` zeros and scales, for
    nothing: refused (block_size=2**20 on 64-wide layers wrote an artifact 4,762x larger)."""
    widths = [int(G.get_attr_value(gm, str(layer.weight.target)).shape[-1]) for layer in chosen if layer.weight is not None]
    if not widths:
        return
    widest = max(widths)
    fits = max(16, 1 << (widest - 1).bit_length())  # the smallest allowed block that holds the widest row
    if block_size > fits:
        raise ConfigError(
            f"quantize block_size={block_size} is wider than every layer it would quantize (the widest has "
            f"{widest} inputs): each row would be padded {block_size / widest:,.0f}x",
            where="quantize.block_size",
            hint=f"use block_size <= {fits} (one block per row at {fits})",
        )

