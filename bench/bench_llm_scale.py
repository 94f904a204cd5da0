"""LLMs at the sizes people deploy: compile time, peak memory, artifact size, prefill and decode of
torchkiln against ONNX Runtime GenAI's model builder and loop, on ``save_pretrained`` checkpoints of
random weights (speed and memory do not depend on the values).

Each checkpoint is written straight into safetensors shards in bf16, one tensor at a time (a shard
of at most ``--shard-gb`` is the most ever held), from shapes taken on the meta device: an 8B
checkpoint is written on a 24 GiB machine. Then, each tool in its own process under
``/usr/bin/time -v`` (wall time, peak resident set):

* compile: ``kiln export DIR --passes cleanup,quantize:mode=weight_only,... --no-verify`` (random
  weights: the error against eager is measured and shown, not gated) against
  ``python -m onnxruntime_genai.models.builder -i DIR -p int4|int8 -e cpu`` (block 32, accuracy
  level 4: int8 compute, the builder's CPU default);
* run: a child process loads the artifact and times prefill (a ``--prompt``-token prompt, empty
  cache) and decode (``--new`` tokens, per token after the first) at batch 1 and 8, through
  ``CompiledModel.generate`` and GenAI's ``Generator`` loop; for ours also the loop's own cost per
  token at batch 1 (a generation's wall time less the time inside ONNX Runtime's run calls, per new
  token; GenAI's loop is C++ and not separable this way).

A tool that fails or runs out of memory is a row saying so. The machine line names the CPU.

    python bench/bench_llm_scale.py --sizes llama-0.5b              # one size, both tools, int4 RTN
    python bench/bench_llm_scale.py --sizes llama-0.5b,llama-1b --precisions int4,int8
    python bench/bench_llm_scale.py --write-only --sizes llama-8b   # only the checkpoint
    python bench/bench_llm_scale.py --sizes llama-tiny --new 8      # a smoke run in a minute
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

#: transformers config fields per size (Llama 3 / Qwen 2.5 shapes; bf16 checkpoints)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),  # a smoke run
    "llama-0.5b": dict(model_type="llama", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32000),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                     num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}  # fmt: skip
#: ours: the passes per precision; GenAI: its --precision
OURS = {
    "int4": "cleanup,quantize:mode=weight_only,bits=4,block_size=32",
    "int4-gptq": "cleanup,quantize:mode=weight_only,bits=4,block_size=32,method=gptq",
    "int8": "cleanup,quantize:mode=weight_only,bits=8,block_size=32",
}
GENAI = {"int4": "int4", "int8": "int8"}  # the builder's GPTQ needs a GPTQ checkpoint: no int4-gptq row


def config(size: str) -> Any:
    import transformers

    fields = dict(SHAPES[size])
    kind = fields.pop("model_type")
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=4096, torch_dtype="bfloat16")
    return transformers.AutoConfig.for_model(kind, **fields, **special)


def write_checkpoint(size: str, directory: Path, shard_gb: float = 2.0, seed: int = 0) -> int:
    """A ``save_pretrained``-style directory of random bf16 weights (config.json, sharded
    model-*.safetensors and their index), written tensor by tensor; returns its bytes. Norm weights
    are ones, the rest normal with std 0.02."""
    import transformers
    from safetensors.torch import save_file

    cfg = config(size)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(cfg)
    shapes = {name: (t.shape, "norm" in name) for name, t in meta.state_dict().items()}
    cfg.architectures = [type(meta).__name__]  # the GenAI builder picks its model by this
    cfg.save_pretrained(directory)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    held, index, total, files = 0, {}, 0, []

    def flush() -> None:
        nonlocal shard, held
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            files.append(name)
            index.update(dict.fromkeys(shard, name))
            shard, held = {}, 0

    for name, (shape, ones) in shapes.items():
        tensor = torch.ones(shape, dtype=torch.bfloat16) if ones else (torch.randn(shape, generator=generator) * 0.02).bfloat16()
        if held and held + tensor.nbytes > shard_gb * 2**30:
            flush()
        shard[name], held, total = tensor, held + tensor.nbytes, total + tensor.nbytes
    flush()
    count = len(files)
    for old in files:  # the Hugging Face names: model-00001-of-00004.safetensors
        (directory / old).rename(directory / old.replace(".safetensors", f"-of-{count:05d}.safetensors"))
    weight_map = {k: v.replace(".safetensors", f"-of-{count:05d}.safetensors") for k, v in index.items()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    _tokenizer(directory)
    return total


def _tokenizer(directory: Path) -> None:
    """The GenAI builder copies a tokenizer from the checkpoint: a small byte-level one trained here
    (the benchmark feeds token ids; the vocabulary does not matter)."""
    from torchkiln.models import stdlib_lm

    stdlib_lm.train_tokenizer(stdlib_lm.corpus()[:100_000], directory, vocab_size=512)


def timed_process(command: list[str], log: Path) -> dict[str, Any]:
    """Run ``command`` under /usr/bin/time -v: wall seconds, peak RSS GiB, exit code, last error line."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-v", *command], stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("\t")]
    return {"seconds": time.perf_counter() - start, "peak_gib": int(peak.group(1)) / 2**20 if peak else math.nan,
            "code": done.returncode, "last": lines[-1][:160] if lines else ""}  # fmt: skip


def compile_ours(checkpoint: Path, out: Path, precision: str, work: Path) -> dict[str, Any]:
    kiln = [sys.executable, "-m", "torchkiln.cli", "export", str(checkpoint), "--task", "text-generation",
            "--passes", OURS[precision], "--backend-option", "nbits_accuracy_level=4", "-o", str(out), "--quiet",
            "--no-verify"]  # random weights: int4's error is measured and reported (the cosine column), not gated  # fmt: skip
    if "gptq" in precision:
        kiln += ["--calibration", "random:16"]
    return timed_process(kiln, work / f"ours-{precision}.log")


def compile_genai(checkpoint: Path, out: Path, precision: str, work: Path) -> dict[str, Any]:
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
               "-p", GENAI[precision], "-e", "cpu", "-c", str(work / "genai-cache"),
               "--extra_options", "block_size=32", "accuracy_level=4"]  # fmt: skip
    return timed_process(builder, work / f"genai-{precision}.log")


RUN = r"""
import json, sys, torch
sys.path.insert(0, {bench!r})
import bench_generate as g
tool, path, prompt, new, vocab = {tool!r}, {path!r}, {prompt}, {new}, {vocab}
if tool == "ours":
    import torchkiln
    variant = g.ours(torchkiln.load(path))
else:
    from pathlib import Path
    variant = g.genai(Path(path))
rows = {{}}
for batch in (1, 8):
    prefill, decode = g.measure({{"v": variant}}, batch, prompt, new, 2, vocab)["v"]
    rows[batch] = [prefill, decode]
if tool == "ours":  # the loop's own cost per token at batch 1: wall time less the time inside ONNX Runtime
    import statistics, time, onnxruntime as ort
    inside = [0.0]
    def timing(method):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start
        return run
    ort.InferenceSession.run = timing(ort.InferenceSession.run)
    ort.InferenceSession.run_with_iobinding = timing(ort.InferenceSession.run_with_iobinding)
    ids = torch.randint(3, vocab, (1, prompt))
    spent = []
    for _ in range(5):
        inside[0] = 0.0
        start = time.perf_counter()
        variant.generate(ids, new)
        spent.append((time.perf_counter() - start - inside[0]) / new * 1e3)
    rows["overhead_ms"] = statistics.median(spent)
print("RESULT " + json.dumps(rows))
"""


def run_artifact(tool: str, path: Path, prompt: int, new: int, vocab: int, work: Path) -> dict[str, Any]:
    """Prefill ms and decode tokens/s at batch 1 and 8, in a child process (its own memory)."""
    script = RUN.format(bench=str(Path(__file__).parent), tool=tool, path=str(path), prompt=prompt, new=new, vocab=vocab)
    log = work / f"run-{tool}-{path.name}.log"
    result = timed_process([sys.executable, "-c", script], log)
    found = re.search(r"RESULT (.*)", log.read_text(errors="replace"))
    result["rows"] = json.loads(found.group(1)) if found else None
    return result


def _cosine(artifact: Path) -> float | None:
    """The logits' cosine against eager that compiling measured (our report; GenAI measures none)."""
    try:
        return json.loads((artifact / "manifest.json").read_text())["report"]["artifact"]["cosine"]
    except (OSError, KeyError, ValueError):
        return None


def size_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30 if path.exists() else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="llama-0.5b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="int4", help=f"comma-separated, of {', '.join(OURS)}")
    parser.add_argument("--tools", default="ours,genai")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--work", help="keep checkpoints and artifacts here (default: a temporary directory)")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoints and stop")
    args = parser.parse_args(argv)
    from torchkiln.driver.benchmark import machine_line

    print(machine_line(), flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="llm-scale-"))
    rows = []
    for size in args.sizes.split(","):
        checkpoint = work / size / "hf"
        if not (checkpoint / "config.json").exists():
            print(f"[{size}] writing the checkpoint", file=sys.stderr, flush=True)
            start = time.perf_counter()
            total = write_checkpoint(size, checkpoint, args.shard_gb)
            print(f"[{size}] {total / 2**30:.2f} GiB of bf16 weights in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        if args.write_only:
            continue
        vocab = SHAPES[size]["vocab_size"]
        for precision in args.precisions.split(","):
            for tool in args.tools.split(","):
                if tool == "genai" and precision not in GENAI:
                    continue
                out = work / size / f"{tool}-{precision}"
                shutil.rmtree(out, ignore_errors=True)
                print(f"[{size}] {tool} {precision}: compiling", file=sys.stderr, flush=True)
                built = (compile_ours if tool == "ours" else compile_genai)(checkpoint, out, precision, work / size)
                row = {"size": size, "tool": tool, "precision": precision, "compile": built, "artifact_gib": size_gib(out),
                       "cosine": _cosine(out) if tool == "ours" else None}  # fmt: skip
                if built["code"] == 0:
                    print(f"[{size}] {tool} {precision}: running", file=sys.stderr, flush=True)
                    row["run"] = run_artifact(tool, out, args.prompt, args.new, vocab, work / size)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    if rows:
        print(table(rows, size_gib_of={s: size_gib(work / s / "hf") for s in args.sizes.split(",")}))
    return 0


def table(rows: list[dict[str, Any]], size_gib_of: dict[str, float]) -> str:
    lines = ["| size | precision | tool | compile s | peak RSS GiB (x checkpoint) | artifact GiB | cosine vs eager | prefill ms b1 | decode tok/s b1 | decode tok/s b8 | loop ms/token b1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        built, run = row["compile"], (row.get("run") or {}).get("rows")
        if built["code"] != 0:
            lines.append(f"| {row['size']} | {row['precision']} | {row['tool']} | failed (exit {built['code']}): {built['last']} | | | | | | | |")
            continue
        ratio = built["peak_gib"] / size_gib_of[row["size"]]
        speed = [f"{run['1'][0]:.1f}", f"{run['1'][1]:.1f}", f"{run['8'][1]:.1f}"] if run else ["-", "-", "-"]
        loop = f"{run['overhead_ms']:.3f}" if run and "overhead_ms" in run else "not separable (C++ loop)"
        cosine = f"{row['cosine']:.4f}" if row.get("cosine") is not None else "not measured"
        lines.append(f"| {row['size']} | {row['precision']} | {row['tool']} | {built['seconds']:.0f} | {built['peak_gib']:.2f} ({ratio:.1f}x) "
                     f"| {row['artifact_gib']:.2f} | {cosine} | {' | '.join(speed)} | {loop} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
