"""Per-call overhead: what ``CompiledModel.__call__`` adds above each runtime's own call.

A model that computes almost nothing (one ``Linear(16, 16)``, batch 1) is compiled for every CPU
backend, and for each the runtime's most direct call is timed side by side with the compiled model
(as compiled, and loaded back from disk, which also checks outputs against the manifest):

* ``onnxruntime`` — ``InferenceSession.run(None, {name: ndarray})`` with the arrays made beforehand;
* ``openvino`` — ``InferRequest.set_input_tensor`` (a tensor sharing the array) + ``infer()``;
* ``inductor`` — the AOTInductor package's ``loader.run([tensor])`` (no pytree);
* ``torch`` — the saved graph module's ``forward``.

Overhead = median(compiled call) - median(raw call), in microseconds. The goal is <= 50 us on every
backend. Medians of the interleaved timer (alternating blocks of 200 calls).

    python bench/bench_overhead.py                 # 4000 timed calls each
    python bench/bench_overhead.py --runs 1000 --json overhead.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import torchkiln
from torchkiln.driver.benchmark import interleaved_times, machine_line

GOAL_US = 50.0


def raw_call(backend: str, artifact: Any, x: torch.Tensor) -> Callable[[], Any]:
    """The runtime's own call on prepared inputs, without torchkiln in between."""
    if backend == "onnxruntime":
        session, feeds = artifact.session, {artifact.session.get_inputs()[0].name: x.numpy()}
        return lambda: session.run(None, feeds)
    if backend == "openvino":
        import openvino

        request, tensor = artifact.compiled.create_infer_request(), openvino.Tensor(x.numpy(), shared_memory=True)

        def infer() -> None:
            request.set_input_tensor(0, tensor)
            request.infer()

        return infer
    if backend == "inductor":
        loader, tensors = artifact._runner.loader, [x]
        return lambda: loader.run(tensors)
    module = artifact.module
    return lambda: module(x)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(machine_line())
    model, x = nn.Linear(16, 16).eval(), torch.randn(1, 16)
    backends = ["torch", "onnxruntime", "inductor"] + (["openvino"] if importlib.util.find_spec("openvino") else [])
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            print(f"building {backend}", file=sys.stderr)
            compiled = torchkiln.compile(model, x, backend=backend, latency_runs=0)
            loaded = torchkiln.load(compiled.save(f"{tmp}/{backend}"), allow_native_code=True)
            calls[(backend, "raw")] = raw_call(backend, compiled.artifact, x)
            calls[(backend, "compiled")] = lambda c=compiled: c(x)
            calls[(backend, "loaded")] = lambda c=loaded: c(x)
        times = interleaved_times(calls, args.runs, block=200, settle=0.02)
    medians = {key: sorted(t)[len(t) // 2] * 1e3 for key, t in times.items()}
    rows = []
    print(f"{'backend':12s} {'raw us':>8s} {'compiled us':>12s} {'loaded us':>10s} {'overhead us':>12s}  goal <= {GOAL_US:.0f} us")
    for backend in backends:
        raw, compiled, loaded = (medians[(backend, kind)] for kind in ("raw", "compiled", "loaded"))
        overhead = max(compiled, loaded) - raw
        rows.append({"backend": backend, "raw_us": raw, "compiled_us": compiled, "loaded_us": loaded, "overhead_us": overhead})
        verdict = "met" if overhead <= GOAL_US else "NOT met"
        print(f"{backend:12s} {raw:8.1f} {compiled:12.1f} {loaded:10.1f} {overhead:12.1f}  {verdict}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine_line(), "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
