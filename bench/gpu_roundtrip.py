"""GPU check: a torch-backend artifact placed on CUDA (fp16, CUDA graphs) is saved, loaded in a fresh
process and gives the same outputs; prints its error against eager and the replay latency ratio."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import torchkiln
from torchkiln import models

LOAD = """
import sys, torch, torchkiln
from torchkiln import models
entry = models.get(sys.argv[1])
inputs = {k: v.cuda() for k, v in entry.example_inputs().items()}
out = torchkiln.load(sys.argv[2])(**inputs)
torch.save(out.cpu(), sys.argv[3])
"""


def _mean_ms(run, inputs, runs: int = 50) -> float:
    with torch.no_grad():
        for _ in range(5):
            run(**inputs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(runs):
            run(**inputs)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / runs * 1e3


def main() -> int:
    failures = 0
    for name in ("resnet", "text_encoder"):
        entry = models.get(name)
        model, inputs = entry.build().eval(), entry.example_inputs()
        options = {"device": "cuda", "dtype": "float16", "cuda_graphs": True}
        compiled = torchkiln.compile(model, inputs, backend="torch", backend_options=options,
                                     tolerance=torchkiln.Tolerance(min_cosine=0.999), latency_runs=0)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            path = compiled.save(Path(tmp) / "artifact")
            out_file = Path(tmp) / "out.pt"
            subprocess.run([sys.executable, "-c", LOAD, name, str(path), str(out_file)], check=True)
            reloaded = torch.load(out_file, weights_only=True)
        cuda_inputs = {k: v.cuda() for k, v in inputs.items()}
        here = compiled(**cuda_inputs).cpu()
        with torch.no_grad():
            eager = model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(here.flatten(), eager.flatten(), dim=0).item()
        same = torch.equal(here, reloaded)
        timings = {
            "eager-cpu": _mean_ms(model, inputs),
            "torch-cuda-fp16": _mean_ms(compiled, cuda_inputs),
        }
        ok = same and cosine >= 0.999
        failures += not ok
        print(f"{name}: cosine vs eager {cosine:.6f}, reloaded in a fresh process identical={same}, "
              f"eager-cpu {timings['eager-cpu']:.3f} ms, torch-cuda-fp16 {timings['torch-cuda-fp16']:.3f} ms "
              f"({timings['eager-cpu'] / timings['torch-cuda-fp16']:.2f}x) -> {'ok' if ok else 'FAILED'}")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
