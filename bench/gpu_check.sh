#!/usr/bin/env bash
# The GPU check a lent device machine runs (`make gpu-check PYTHON=python3`), in one call of at most
# ~8 minutes: every GPU-marked test, the torch backend's CUDA save/load round trip, and the short GPU
# bench (bench/gpu_bench.py: ResNet-50 and BERT-base at batch 1 and 32 — eager fp32, torch fp16 +
# CUDA graphs, Inductor CUDA bf16, Inductor CUDA int8). Runs from source (PYTHONPATH=.), installs
# nothing. Writes logs and one JSON of results, gpu-check.json, under $OUT when it is set (the device
# tool brings them back), else under out/gpu-check.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG="${OUT:-out/gpu-check}"
mkdir -p "$LOG"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TORCHKILN_CACHE_DIR="$(mktemp -d)"
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c 'import sys, torch, onnx, onnxruntime as ort; print("python", sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "onnx", onnx.__version__, "onnxruntime", ort.__version__)'
  grep -m1 "model name" /proc/cpuinfo; } 2>&1 | tee "$LOG/env.txt"
echo "== GPU-marked tests (tests/test_gpu_backends.py only: the other test modules need the [dev] extras)"
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 150 "$PY" -m pytest -p no:cacheprovider -m gpu -rs tests/test_gpu_backends.py 2>&1 | tee "$LOG/gpu-tests.txt"
  tests_rc=${PIPESTATUS[0]}
else
  echo "pytest is not installed for $PY: the GPU tests did not run" | tee "$LOG/gpu-tests.txt"
  tests_rc=3
fi
[ "$tests_rc" = 0 ] || status=1
echo "== torch backend on CUDA: save/load round trip in a fresh process"
timeout 45 "$PY" bench/gpu_roundtrip.py 2>&1 | tee "$LOG/roundtrip.txt" || status=1
echo "== GPU bench: ResNet-50 and BERT-base, batch 1 and 32"
timeout 270 "$PY" bench/gpu_bench.py --json "$LOG/gpu-bench.json" 2>&1 | tee "$LOG/gpu-bench.txt"
bench_rc=${PIPESTATUS[0]}; [ "$bench_rc" = 0 ] || status=1
"$PY" - "$LOG" "$tests_rc" "$bench_rc" <<'PYEOF'
import json, pathlib, sys
log, tests_rc, bench_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tests = (log / "gpu-tests.txt").read_text().strip().splitlines()
bench = json.loads((log / "gpu-bench.json").read_text()) if (log / "gpu-bench.json").exists() else {}
result = {"env": (log / "env.txt").read_text().splitlines(), "tests": {"rc": tests_rc, "summary": tests[-1] if tests else ""},
          "bench": {"rc": bench_rc, **bench}}
(log / "gpu-check.json").write_text(json.dumps(result, indent=2))
print("wrote", log / "gpu-check.json")
PYEOF
exit $status
