"""Generation speed: prefill latency and decode tokens/s of decoder LMs, side by side in one process.

For a GPT-2-small-sized model (124M) and a Llama-style model of similar size (random init: speed
does not depend on the weights' values), with a prompt of ``--prompt`` tokens and ``--new`` new
tokens (EOS masked so that every run makes all of them), at batch 1 and 8:

* HF eager: ``transformers``' ``generate(do_sample=False)``;
* HF static cache + torch.compile: the same with ``cache_implementation="static"`` and the forward
  under ``torch.compile`` (transformers' recipe for fast decoding);
* torchkiln fp32 / dynamic int8 / int4 weight-only (block 32; float compute, and int8 compute:
  ``nbits_accuracy_level=4``) artifacts on ONNX Runtime, and fp32 / dynamic int8 / int4 on OpenVINO (when installed),
  through ``CompiledModel.generate``;
* ONNX Runtime GenAI (``onnxruntime-genai``), its model builder run on a ``save_pretrained``
  directory of the same model (fp32 and int4; it has no GPT-2 builder).

Prefill is one forward over the prompt with an empty cache (median of 3); decode is the time of a
generation of ``--new`` tokens less that of one token, per token after the first, reported as
tokens/s over the batch. Variants
are measured in alternating rounds and compared as ratios within this run only.

    python bench/bench_generate.py                      # both models, batch 1 and 8 (~15 min)
    python bench/bench_generate.py --size tiny --new 16 # a smoke run in a minute
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torchkiln
from torchkiln.driver.benchmark import machine_line
from torchkiln.driver.generate import prompt_logits
from torchkiln.models import stdlib_lm

INT4 = "cleanup,quantize:mode=weight_only,bits=4,block_size=32"
PASSES = {  # row -> (passes, backend, backend options)
    "torchkiln fp32": ("cleanup", "onnxruntime", {}),
    "torchkiln int8 (dynamic)": ("cleanup,quantize:mode=dynamic", "onnxruntime", {}),
    "torchkiln int4 (block 32)": (INT4, "onnxruntime", {}),
    "torchkiln int4 (block 32 + int8 compute)": (INT4, "onnxruntime", {"nbits_accuracy_level": 4}),
    "torchkiln fp32 on OpenVINO": ("cleanup", "openvino", {}),
    "torchkiln int8 (dynamic) on OpenVINO": ("cleanup,quantize:mode=dynamic", "openvino", {}),
    "torchkiln int4 (block 32) on OpenVINO": (INT4, "openvino", {}),
    # the cache passed in and out on every step instead of in place (ONNX Runtime: GroupQueryAttention
    # over shared buffers) or kept inside OpenVINO (its stateful form)
    "torchkiln fp32 (cache passed)": ("cleanup", "onnxruntime", {"inplace_cache": False}),
    # W8A8: static int8 (activations calibrated on prompts: prefill and decode steps), SmoothQuant first
    "torchkiln int8 (static + SmoothQuant)": ("cleanup,quantize:smoothquant=0.5", "onnxruntime", {}),
    "torchkiln int8 (static + SmoothQuant) on OpenVINO": ("cleanup,quantize:smoothquant=0.5", "openvino", {}),
    "torchkiln int8 (dynamic) (cache passed)": ("cleanup,quantize:mode=dynamic", "onnxruntime", {"inplace_cache": False}),
    "torchkiln int8 (dynamic) on OpenVINO (cache passed)": ("cleanup,quantize:mode=dynamic", "openvino",
                                                           {"stateful_cache": False}),
}
# the KV cache in int8 (kv_cache=): a quarter of the float cache's bytes (plus per-step scales); its
# cache is passed in and out (ONNX Runtime's in-place GroupQueryAttention takes a float cache)
PASSES["torchkiln fp32 + int8 KV cache"] = ("cleanup", "onnxruntime", {})
PASSES["torchkiln int8 (dynamic) + int8 KV cache"] = ("cleanup,quantize:mode=dynamic", "onnxruntime", {})
PASSES["torchkiln int8 (dynamic) + int8 KV cache on OpenVINO"] = ("cleanup,quantize:mode=dynamic", "openvino", {})
KV_INT8 = {label for label in PASSES if "int8 KV cache" in label}
CALIBRATED = {"torchkiln int8 (static + SmoothQuant)", "torchkiln int8 (static + SmoothQuant) on OpenVINO"}  # rows compiled with calibration prompts
STATIC = "HF static cache + torch.compile"
SIZES = {  # (gpt2 config, llama config) keyword arguments
    "small": (
        dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
        dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
    ),
    "tiny": (
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=1024),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512),
    ),
}  # fmt: skip


def build(name: str, size: str) -> torch.nn.Module:
    import transformers

    gpt2, llama = SIZES[size]
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**gpt2, **special)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, **special)).eval()


class Variant:
    """prefill(ids) and generate(ids, new) of one runtime."""

    def __init__(self, prefill: Callable[[torch.Tensor], Any], generate: Callable[[torch.Tensor, int], Any]):
        self.prefill, self.generate = prefill, generate


def eager(model: Any) -> Variant:
    def generate(ids: torch.Tensor, new: int) -> Any:
        mask = torch.ones_like(ids)
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return Variant(lambda ids: model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True), generate)


def static_compiled(model: Any) -> Variant:
    """transformers' fast path: a static cache and ``torch.compile`` of the forward (its documented
    recipe; on CPU the default mode, as CUDA graphs do not apply). Each new shape compiles once, in
    the warm-up."""
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, fullgraph=True, dynamic=False)

    def generate(ids: torch.Tensor, new: int) -> Any:
        return compiled.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, cache_implementation="static")  # fmt: skip

    return Variant(lambda ids: generate(ids, 1), generate)


def ours(compiled: Any) -> Variant:
    return Variant(
        lambda ids: prompt_logits(compiled, ids),
        lambda ids, new: compiled.generate(ids, max_new_tokens=new, min_new_tokens=new),
    )


def genai(directory: Path) -> Variant:
    import onnxruntime_genai as og

    model = og.Model(str(directory))

    def generator(ids: torch.Tensor, new: int) -> Any:
        params = og.GeneratorParams(model)
        length = ids.shape[1] + new
        params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=ids.shape[0])
        made = og.Generator(model, params)
        made.append_tokens(ids.numpy().astype(np.int32))  # runs the prompt
        return made

    def generate(ids: torch.Tensor, new: int) -> Any:
        made = generator(ids, new)
        while not made.is_done():
            made.generate_next_token()
        return made

    return Variant(lambda ids: generator(ids, 1), generate)


def build_genai(model: Any, precision: str, root: Path) -> Path:
    """Run ONNX Runtime GenAI's model builder on a save_pretrained directory of ``model``."""
    source = root / "hf"
    if not source.exists():
        model.save_pretrained(source)
        text = stdlib_lm.corpus()[:200_000]  # the builder copies a tokenizer; any will do for token ids
        stdlib_lm.train_tokenizer(text, source, vocab_size=512)
    out = root / f"genai-{precision}"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(root / "cache")]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    return out


def _has_genai() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        call()
    return time.perf_counter() - start


def measure(variants: dict[str, Variant], batch: int, prompt: int, new: int, repeats: int, vocab: int) -> dict[str, tuple[float, float]]:
    """name -> (prefill ms, decode tokens/s), medians over ``repeats`` alternating rounds."""
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    for variant in variants.values():  # warm up: first runs allocate and pick kernels; torch.compile
        for length in (1, 2, new):     # compiles once per static-cache length, here and not while timed
            timed(lambda v=variant, n=length: v.generate(ids, n))
    prefill: dict[str, list[float]] = {name: [] for name in variants}
    decode: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            first = statistics.median(timed(lambda v=variant: v.prefill(ids)) for _ in range(3))
            one = statistics.median(timed(lambda v=variant: v.generate(ids, 1)) for _ in range(3))
            whole = timed(lambda v=variant: v.generate(ids, new))
            prefill[name].append(first * 1e3)
            decode[name].append(decode_rate(batch, new, whole, one))
            print(f"  batch {batch} {name}: prefill {first * 1e3:.1f} ms, decode {_rate(decode[name][-1])} tokens/s", file=sys.stderr)
    return {name: (statistics.median(prefill[name]), statistics.median(decode[name])) for name in variants}


#: the decode steps must take at least this share of the whole generation to be timed apart from the prompt
MIN_DECODE_SHARE = 0.1


def decode_rate(batch: int, new: int, whole: float, one: float) -> float:
    """Tokens/s of the ``new - 1`` decode steps (the first new token comes with the prompt): NaN
    when they are not measurable — one new token, or the steps lost in the timing noise of the
    prompt (whole - one below :data:`MIN_DECODE_SHARE` of whole; a tiny model or a drifting machine
    made that difference negative)."""
    steps = whole - one
    if new < 2 or steps < MIN_DECODE_SHARE * whole:
        return math.nan
    return batch * (new - 1) / steps


def _rate(value: float) -> str:
    return "not measured (decode lost in the timing noise; raise --new)" if math.isnan(value) else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--rows", help="comma-separated runtimes to keep (default: all), e.g. 'HF eager,ORT GenAI int4'")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    args = parser.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    print(machine_line())
    print(f"torch {torch.__version__}, prompt {args.prompt}, {args.new} new tokens, {args.size} models\n")
    keep = None if args.rows is None else {r.strip() for r in args.rows.split(",")}

    def wanted(label: str) -> bool:
        return keep is None or label in keep

    rows = []
    for name in args.models.split(","):
        model = build(name, args.size)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        variants = {"HF eager": eager(model)} if wanted("HF eager") else {}
        if wanted(STATIC):
            variants[STATIC] = static_compiled(model)
        example = torch.randint(3, 100, (1, 8))
        with tempfile.TemporaryDirectory() as scratch:
            for label, (passes, backend, options) in PASSES.items():
                if not wanted(label) or (backend == "openvino" and not importlib.util.find_spec("openvino")):
                    continue
                print(f"{name}: compiling {label}", file=sys.stderr)
                static = label in CALIBRATED
                prompts = [torch.randint(3, 100, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(8)]
                with contextlib.redirect_stdout(io.StringIO()):
                    compiled = torchkiln.compile(
                        model, {"input_ids": example, "attention_mask": torch.ones_like(example)}, passes=passes, latency_runs=0,
                        backend=backend, backend_options=options, calibration_data=prompts if static else None,
                        kv_cache="int8" if label in KV_INT8 else "float",
                        verify=False,  # random weights: int4 misses its cosine promise; accuracy is the perplexity table's
                    )
                variants[label] = ours(compiled)
            if name == "llama" and not _has_genai():
                print("ORT GenAI rows skipped: pip install onnxruntime-genai (or torchkiln[bench])", file=sys.stderr)
            elif name == "llama":
                for precision in [p for p in ("fp32", "int4") if wanted(f"ORT GenAI {p}")]:
                    print(f"{name}: building ONNX Runtime GenAI {precision}", file=sys.stderr)
                    variants[f"ORT GenAI {precision}"] = genai(build_genai(model, precision, Path(scratch)))
            vocab = model.config.vocab_size
            for batch in (int(b) for b in args.batches.split(",")):
                for label, (prefill, rate) in measure(variants, batch, args.prompt, args.new, args.repeats, vocab).items():
                    rows.append((f"{name} ({params:.0f}M)", batch, label, prefill, rate))
    print(table(rows))
    return 0


def table(rows: list[tuple[str, int, str, float, float]]) -> str:
    """Markdown, with each row's decode rate relative to HF eager, to HF static cache + torch.compile
    and to torchkiln fp32 of its model and batch."""
    references = [{(m, b): r for m, b, label, _, r in rows if label == name} for name in ("HF eager", STATIC, "torchkiln fp32")]
    lines = ["| model | batch | runtime | prefill ms | decode tokens/s | vs HF eager | vs HF static+compile | vs torchkiln fp32 |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for model, batch, label, prefill, rate in rows:
        ratios = [f"{rate / ref[model, batch]:.2f}x" if (model, batch) in ref and not math.isnan(rate / ref[model, batch]) else "-"
                  for ref in references]  # fmt: skip
        cell = "-" if math.isnan(rate) else f"{rate:.1f}"
        lines.append(f"| {model} | {batch} | {label} | {prefill:.1f} | {cell} | {' | '.join(ratios)} |")
    if any(math.isnan(rate) for *_, rate in rows):
        lines.append(f"\n'-' decode: not measurable — the decode steps took under {MIN_DECODE_SHARE:.0%} of the generation's time (raise --new)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
