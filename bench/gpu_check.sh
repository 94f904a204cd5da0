#!/usr/bin/env bash
# The GPU check a lent device machine runs (`make gpu-check PYTHON=python3`): the GPU-marked tests
# and `kiln bench` GPU rows side by side with eager, in one call. Runs from source (PYTHONPATH=.);
# writes logs under $OUT when it is set (the device tool brings them back), else under out/gpu-check.
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
echo "== GPU-marked tests"
"$PY" -m pytest -p no:cacheprovider -m gpu -rs tests/test_gpu_backends.py 2>&1 | tee "$LOG/gpu-tests.txt" || status=1
echo "== torch backend on CUDA: save/load round trip in a fresh process"
"$PY" bench/gpu_roundtrip.py 2>&1 | tee "$LOG/roundtrip.txt" || status=1
for model in resnet text_encoder; do
  echo "== kiln bench $model (eager CPU vs CUDA runtimes, one process)"
  timeout 240 "$PY" -m torchkiln.cli bench "$model" --runtimes eager,eager-cuda,torch-cuda-fp16,tensorrt-fp16 \
    --batch-sizes 1,8 --runs 50 2>&1 | tee "$LOG/bench-$model.txt" || status=1
done
exit $status
