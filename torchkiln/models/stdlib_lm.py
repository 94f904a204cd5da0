"""A small Llama-style LM trained on Python's own standard-library sources, and its BPE tokenizer.

Random weights hide quantization damage: their logits are nearly flat and any rounding keeps the
argmax. This LM is trained in a couple of minutes on 2 CPU cores on a corpus every Python ships,
so tests and benchmarks can measure held-out perplexity of fp32 / fp16 / int8 / int4 artifacts
offline. Needs ``transformers`` and ``tokenizers``.

The corpus is a fixed list of standard-library modules (read from ``sysconfig``'s stdlib path):
the first 90% of their text trains, the last 10% is held out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.compiler import files
from torchkiln.errors import ConfigError

#: modules of plain, varied Python (no generated tables), ~1.4 MB together
MODULES = (
    "argparse", "ast", "calendar", "collections/__init__", "configparser", "csv", "dataclasses", "datetime",
    "difflib", "enum", "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "json/decoder",
    "json/encoder", "logging/__init__", "optparse", "pathlib", "pprint", "shutil", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "typing", "zipfile",
)  # fmt: skip
VOCAB = 1024
WINDOW = 128


def corpus() -> str:
    """The standard-library sources of :data:`MODULES`, concatenated (modules missing from this
    Python's layout are skipped; at least 20 must be found)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for m in MODULES if (p := root / f"{m}.py").is_file()]
    if len(texts) < 20:
        raise ConfigError(f"found {len(texts)} of the corpus' standard-library modules under {root}")
    return "\n".join(texts)


def train_tokenizer(text: str, directory: str | Path, vocab_size: int = VOCAB) -> Any:
    """A byte-level BPE trained on ``text``, saved as a transformers tokenizer directory."""
    try:
        import tokenizers
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "the stdlib LM needs transformers and tokenizers", hint="pip install 'torchkiln[hf]'"
        ) from exc
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([text], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(str(directory))
    return tokenizer


#: model shapes and training budgets: "small" (2.0M parameters, ~150 s on 2 cores) for tests,
#: "medium" (~21M, ~25 min on 2 cores; trained once and cached by :func:`trained`) for benchmarks
SIZES: dict[str, dict[str, int]] = {
    "small": dict(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512, steps=600, batch=16),
    "medium": dict(hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1536, steps=800, batch=16),
}


def build(vocab_size: int = VOCAB, size: str = "small") -> nn.Module:
    """Llama-style, rotary positions; "small": 4 layers, 192 wide, 6 query heads over 2 KV heads
    (2.0M parameters). Special tokens: pad 0, bos 1, eos 2 (as :func:`train_tokenizer` numbers them)."""
    import transformers

    shape = _size(size)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        intermediate_size=shape["intermediate"], max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _size(size: str) -> dict[str, int]:
    if size not in SIZES:
        raise ConfigError(f"unknown stdlib LM size {size!r}", hint=f"one of {', '.join(SIZES)}")
    return SIZES[size]


def trained(
    size: str = "small", cache: str | Path | None = None, progress: Callable[[str], None] | None = None
) -> tuple[nn.Module, Any, Split]:
    """(model, tokenizer, split) of the ``size`` LM, trained with seed 0 — or loaded from ``cache``
    (default ``$TORCHKILN_LM_CACHE`` or ``~/.cache/torchkiln/lm``) where an earlier call saved it under a
    hash of the corpus, the shape and the training budget. Saved whole or not at all through the
    destination policy (``compiler.files``: written beside and swapped in; a directory there that is
    not our cache entry is refused before the training); loading reads safetensors and a tokenizer
    file, never code."""
    import transformers

    shape = _size(size)
    text = corpus()
    key = hashlib.sha256(repr((sorted(shape.items()), VOCAB, WINDOW, MODULES, transformers.__version__.split(".")[0],
                               hashlib.sha256(text.encode()).hexdigest())).encode()).hexdigest()[:16]  # fmt: skip
    root = Path(cache or os.environ.get("TORCHKILN_LM_CACHE") or Path.home() / ".cache" / "torchkiln" / "lm")
    directory = root / f"stdlib-{size}-{key}"
    if files.is_ours(directory, "cache") and (directory / "model.safetensors").is_file():
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
        model = transformers.LlamaForCausalLM.from_pretrained(str(directory), use_safetensors=True).eval()
        return model, tokenizer, split(tokenizer, text)
    files.check_destination(directory, "cache")  # before the training: a directory not ours is refused
    with files.atomic_directory(directory, "cache") as work:
        tokenizer = train_tokenizer(text, work)
        data = split(tokenizer, text)
        torch.manual_seed(0)
        model = train(build(size=size), data.train, steps=shape["steps"], batch=shape["batch"], progress=progress)
        model.save_pretrained(work, safe_serialization=True)  # type: ignore[operator]
        files.write_marker(work, "cache", what=f"stdlib LM {size}", key=key)
    return model, tokenizer, data


@dataclasses.dataclass(frozen=True)
class Split:
    train: torch.Tensor  # [N] token ids
    held_out: torch.Tensor  # [M, WINDOW] windows


def split(tokenizer: Any, text: str, held_out_windows: int = 32) -> Split:
    """Token ids of the first 90% of ``text`` (training) and ``held_out_windows`` windows of the rest."""
    cut = int(len(text) * 0.9)
    train = torch.tensor(tokenizer(text[:cut])["input_ids"])
    rest = torch.tensor(tokenizer(text[cut:])["input_ids"])
    usable = min(held_out_windows, len(rest) // WINDOW)
    return Split(train, rest[: usable * WINDOW].reshape(usable, WINDOW))


def train(
    model: nn.Module,
    tokens: torch.Tensor,
    steps: int = 600,
    batch: int = 16,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """AdamW with warm-up and cosine decay on random windows; deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        offsets = torch.randint(0, len(tokens) - WINDOW - 1, (batch,), generator=generator)
        window = torch.stack([tokens[o : o + WINDOW] for o in offsets.tolist()])
        loss = model(input_ids=window, labels=window, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None and (step + 1) % 50 == 0:
            progress(f"step {step + 1}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    return model.eval()


def perplexity(
    logits_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor, batch: int = 8
) -> float:
    """exp(mean next-token cross-entropy) of ``logits_of(ids [b, WINDOW]) -> [b, WINDOW, vocab]``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = windows[start : start + batch]
            logits = logits_of(ids)[:, :-1].float()
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)
