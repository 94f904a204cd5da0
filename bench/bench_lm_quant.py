"""Quantization quality on trained LMs: held-out perplexity of weight-only round to nearest, GPTQ
and AWQ (int4 at blocks 128 and 32, int3 at block 64) against NNCF's ``compress_weights``, and of
W8A8 (static int8, with and without SmoothQuant) against dynamic int8, side by side.

The LM is :mod:`torchkiln.models.stdlib_lm` (``--size small``: 2.0M parameters, trained in ~150 s;
``medium``: ~20M, trained once in ~16 min and cached). Calibration: ``--calibration`` windows of 128
tokens from the training text (as prompts: each runs as a prefill then 4 greedy decode steps, see
``causal_lm.calibration_steps``); QAT rows fine-tune on ``--train`` other windows of the training
text (the same expansion), toward the fp32 model; perplexity on the 32 held-out windows of 128 tokens, through each
artifact with an empty cache. torchkiln rows run on ONNX Runtime; NNCF rows compress the fp32
OpenVINO IR of the same graph with the same calibration inputs and run on OpenVINO (their fp32 row
is the reference for them). NNCF's default keeps the embedding and the last Linear (``lm_head``) in
int8 ("backup mode"); the torchkiln rows marked "lm_head int8" do the same, the others quantize
``lm_head`` to the row's grid (the embedding stays float: a lookup). Rows with an int8 KV cache
(``kv_cache=``) read every position of the window through it (attention reads the cache as stored).

    python bench/bench_lm_quant.py                 # small LM, every row (~10 min)
    python bench/bench_lm_quant.py --size medium   # ~20M LM (trains once, ~16 min, then ~25 min)
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from typing import Any

import numpy as np
import torch

import torchkiln
from torchkiln.driver.benchmark import machine_line
from torchkiln.driver.generate import empty_past, prompt_logits, step_inputs
from torchkiln.models import stdlib_lm

W = "cleanup,quantize:mode=weight_only,"
#: row -> passes (torchkiln, ONNX Runtime) or an NNCF recipe
ROWS: dict[str, Any] = {
    "fp32": "cleanup",
    "int4 b128 RTN sym": W + "bits=4,block_size=128",
    "int4 b128 RTN asym": W + "bits=4,block_size=128,symmetric=false",
    "int4 b128 GPTQ asym": W + "bits=4,block_size=128,symmetric=false,method=gptq",
    "int4 b128 GPTQ asym act-order": W + "bits=4,block_size=128,symmetric=false,method=gptq,act_order=true",
    "int4 b128 AWQ asym": W + "bits=4,block_size=128,symmetric=false,method=awq",
    "int4 b128 RTN asym, lm_head int8": ("lm_head", W + "bits=4,block_size=128,symmetric=false"),
    "int4 b128 AWQ asym, lm_head int8": ("lm_head", W + "bits=4,block_size=128,symmetric=false,method=awq"),
    "int4 b128 GPTQ asym, lm_head int8": ("lm_head", W + "bits=4,block_size=128,symmetric=false,method=gptq"),
    "int4 b128 RTN asym + QAT (2 epochs)": W + "bits=4,block_size=128,symmetric=false,qat_epochs=2",
    "int4 b128 RTN asym + QAT (2 epochs, lr 5e-6; run with --train 1024)":
        W + "bits=4,block_size=128,symmetric=false,qat_epochs=2,qat_lr=0.000005",
    "int4 b32 RTN sym": W + "bits=4,block_size=32",
    "int4 b32 GPTQ sym": W + "bits=4,block_size=32,method=gptq",
    "int4 b32 AWQ sym": W + "bits=4,block_size=32,method=awq",
    "int3 b64 RTN asym": W + "bits=3,block_size=64,symmetric=false",
    "int3 b64 GPTQ asym act-order": W + "bits=3,block_size=64,symmetric=false,method=gptq,act_order=true",
    "int3 b64 AWQ asym": W + "bits=3,block_size=64,symmetric=false,method=awq",
    "int3 b64 RTN asym + QAT (2 epochs)": W + "bits=3,block_size=64,symmetric=false,qat_epochs=2",
    "int8 dynamic (W8, activations per call)": "cleanup,quantize:mode=dynamic",
    "W8A8 static": "cleanup,quantize",
    "W8A8 static + SmoothQuant 0.5": "cleanup,quantize:smoothquant=0.5",
    "W8A8 static + SmoothQuant auto": "cleanup,quantize:smoothquant=auto",
    # the KV cache in int8 (kv_cache=...): attention reads the cache as stored, so a prompt's
    # perplexity already reads every position through it
    "fp32 weights, int8 KV cache (scales per step)": ("kv=int8", "cleanup"),
    "fp32 weights, int8 KV cache (scales calibrated)": ("kv=int8-calibrated", "cleanup"),
    "int4 b128 GPTQ asym + int8 KV cache (per step)": ("kv=int8", W + "bits=4,block_size=128,symmetric=false,method=gptq"),
    "W8A8 static + SmoothQuant 0.5 + int8 KV cache (per step)": ("kv=int8", "cleanup,quantize:smoothquant=0.5"),
    "NNCF fp32 (OpenVINO)": {},
    "NNCF int4 b128 asym (data-free)": {"group_size": 128},
    "NNCF int4 b128 asym AWQ + scale estimation": {"group_size": 128, "awq": True, "scale_estimation": True},
    "NNCF int4 b128 asym GPTQ + scale estimation": {"group_size": 128, "gptq": True, "scale_estimation": True},
    "NNCF int4 b32 sym AWQ + scale estimation": {"group_size": 32, "awq": True, "scale_estimation": True, "sym": True},
}


def _kv(recipe: Any) -> str:
    return recipe[0].removeprefix("kv=") if isinstance(recipe, tuple) and recipe[0].startswith("kv=") else "float"


def _passes(recipe: Any) -> str:
    if isinstance(recipe, tuple) and recipe[0].startswith("kv="):
        return str(recipe[1])
    if isinstance(recipe, tuple):  # lm_head in int8 by a second quantize (only it is left as a Linear)
        passes = recipe[1]
        head, _, grid = passes.partition("quantize:mode=weight_only,")
        return f"{head}quantize:mode=weight_only,ignore=model.lm_head,{grid},quantize:mode=weight_only,bits=8,block_size=32"
    return str(recipe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(stdlib_lm.SIZES), default="small")
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of 128 tokens")
    parser.add_argument("--train", type=int, default=64, help="QAT rows: training windows of 128 tokens")
    parser.add_argument("--rows", nargs="*", help="substrings of the rows to run (default: all)")
    parser.add_argument("--skip", nargs="*", default=[], help="substrings of rows to leave out")
    args = parser.parse_args(argv)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    say = functools.partial(print, file=sys.stderr, flush=True)
    print(machine_line())
    print(f"torch {torch.__version__}, onnxruntime {_version('onnxruntime')}, openvino {_version('openvino')}, "
          f"nncf {_version('nncf')}")  # fmt: skip
    model, _, data = stdlib_lm.trained(args.size, progress=say)
    params = sum(p.numel() for p in model.parameters())
    eager = stdlib_lm.perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, data.held_out)
    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data.train) - stdlib_lm.WINDOW, (args.calibration,), generator=generator)
    prompts = [{"input_ids": data.train[s : s + stdlib_lm.WINDOW][None]} for s in starts.tolist()]
    starts = torch.randint(0, len(data.train) - stdlib_lm.WINDOW, (args.train,), generator=generator)
    training = [{"input_ids": data.train[s : s + stdlib_lm.WINDOW][None]} for s in starts.tolist()]
    example = data.held_out[:1, :16]
    inputs = {"input_ids": example, "attention_mask": torch.ones_like(example)}
    print(f"stdlib LM {args.size}: {params / 1e6:.1f}M parameters; fp32 eager held-out perplexity {eager:.3f}; "
          f"calibration {len(prompts)} windows of {stdlib_lm.WINDOW} tokens\n")  # fmt: skip
    print("| row | runtime | perplexity | vs fp32 | file MB | compile s |")
    print("|---|---|---|---|---|---|")
    reference: dict[str, float] = {"ONNX Runtime": eager}
    for row, recipe in ROWS.items():
        if (args.rows and not any(part in row for part in args.rows)) or any(part in row for part in args.skip):
            continue
        say(f"{row} ...")
        start = time.perf_counter()
        try:
            if isinstance(recipe, dict):
                runtime, logits_of, size = "OpenVINO", *_nncf(model, inputs, prompts, recipe)
            else:
                passes = _passes(recipe)
                compiled = torchkiln.compile(model, inputs, passes=passes, backend="onnxruntime", calibration_data=prompts,
                                             train_data=training if "qat" in passes else None, latency_runs=0,
                                             verify=False, kv_cache=_kv(recipe))  # fmt: skip
                runtime, size = "ONNX Runtime", compiled.report.artifact.file_bytes
                if compiled.report.kv_cache:
                    kv = compiled.report.kv_cache
                    say(f"  kv cache {kv['bytes_per_position']} of {kv['float_bytes_per_position']} bytes per position; "
                        f"logits vs the float cache: min cosine {kv['min_cosine']:.6f}")  # fmt: skip
                logits_of = functools.partial(prompt_logits, compiled)
            seconds = time.perf_counter() - start
            measured = stdlib_lm.perplexity(logits_of, data.held_out)
        except Exception as exc:  # noqa: BLE001 - a row that cannot be built says why
            print(f"| {row} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | | |")
            continue
        if row.startswith("NNCF fp32"):
            reference["OpenVINO"] = measured
        base = reference.get(runtime, eager)
        print(f"| {row} | {runtime} | {measured:.3f} | {100 * (measured / base - 1):+.2f}% | {size / 1e6:.2f} | "
              f"{seconds:.0f} |", flush=True)  # fmt: skip
    return 0


def _nncf(model: Any, inputs: dict[str, torch.Tensor], prompts: list[Any], recipe: dict[str, Any]) -> tuple[Any, int]:
    """The fp32 OpenVINO IR of the cached graph, compressed by ``nncf.compress_weights`` (int4 asym by
    default) on the same calibration inputs; returns (logits of ids, compressed weight bytes)."""
    import nncf
    import openvino as ov

    from torchkiln.compiler.causal_lm import calibration_steps

    fp32 = torchkiln.compile(model, inputs, passes="cleanup", backend="openvino", latency_runs=0, verify=False)
    ov_model = ov.Core().read_model(str(fp32.artifact.directory / "model.xml"))
    if recipe:
        # constant folding first: the weights' Transpose from the ONNX MatMul folded into the constants
        # (NNCF's GPTQ refused "Transpose is not supported"; its AWQ + scale estimation gave perplexity 666)
        from openvino._offline_transformations import apply_moc_transformations

        apply_moc_transformations(ov_model, cf=True)
        steps = calibration_steps(fp32, example_graph_inputs(fp32), prompts)  # the graph's own inputs
        dataset = nncf.Dataset([{k: v.numpy() for k, v in step.items()} for step in steps])
        options = dict(recipe)
        mode = nncf.CompressWeightsMode.INT4_SYM if options.pop("sym", False) else nncf.CompressWeightsMode.INT4_ASYM
        data = {} if not (options.get("awq") or options.get("gptq") or options.get("scale_estimation")) else {
            "dataset": dataset, "subset_size": len(steps)}
        # a width the group does not divide (the small LM's 192 at 128): NNCF's own fallback, a smaller
        # group that divides it (torchkiln pads the last block instead)
        advanced = nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)
        ov_model = nncf.compress_weights(ov_model, mode=mode, ratio=1.0, advanced_parameters=advanced, **options, **data)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [port.get_any_name() for port in compiled.inputs]
    size = sum(int(np.prod(c.shape)) * c.get_element_type().size for c in _constants(ov_model))

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        feed = step_inputs(fp32, ids, torch.ones_like(ids), empty_past(fp32, len(ids)))
        result = compiled({name: feed[name].numpy() for name in names})
        return torch.from_numpy(result[compiled.outputs[0]].copy())

    return logits_of, size


def example_graph_inputs(compiled: Any) -> dict[str, torch.Tensor]:
    """Tensors shaped like the graph's inputs (past tensors: [1, heads, 0, dim]), for calibration_steps."""
    feed = step_inputs(compiled, torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long),
                       empty_past(compiled, 1))  # fmt: skip
    return dict(feed)


def _constants(model: Any) -> list[Any]:
    return [op for op in model.get_ops() if op.get_type_name() == "Constant" and int(np.prod(op.shape)) > 1024]


def _version(package: str) -> str:
    try:
        return __import__(package).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
