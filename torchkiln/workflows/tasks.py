"""Hugging Face model directories and generation tasks for the CLI (``--task``).

A directory written by ``save_pretrained`` is loaded with transformers' Auto classes from local
files only, from safetensors weights only (a pickled ``pytorch_model.bin`` is refused with the
conversion command) and never with ``trust_remote_code`` (loading executes no code from the
directory). Whatever transformers or safetensors raise for a broken directory — a config that is
not JSON, truncated weights, a malformed tokenizer — is a one-line ConfigError naming it.
``text-generation`` compiles a causal LM with its KV cache (:mod:`torchkiln.compiler.causal_lm`),
``text2text-generation`` an encoder-decoder as an encoder and a decoder with its cache
(:mod:`torchkiln.compiler.seq2seq`), ``automatic-speech-recognition`` a speech encoder-decoder
(Whisper: ``input_features`` into the encoder) the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchkiln.compiler import causal_lm, seq2seq
from torchkiln.compiler.files import names_existing, parse_json
from torchkiln.errors import ArtifactError, ConfigError, InputError

TASKS = ("text-generation", "text2text-generation", "automatic-speech-recognition")
SPEECH_TASK = "automatic-speech-recognition"
EXAMPLE_TOKENS = 8


def is_pretrained_directory(spec: str) -> bool:
    return names_existing(spec, "dir") and names_existing(Path(spec) / "config.json", "file")


def load_pretrained(directory: str, task: str | None) -> nn.Module:
    """The model of a ``save_pretrained`` directory for ``task`` (inferred from the config's
    architectures when None), in eval mode."""
    task = task or inferred_task(directory)
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "loading a Hugging Face model directory needs transformers", hint="pip install 'torchkiln[hf]'"
        ) from exc
    auto = {
        "text-generation": transformers.AutoModelForCausalLM,
        "text2text-generation": transformers.AutoModelForSeq2SeqLM,
        SPEECH_TASK: transformers.AutoModelForSpeechSeq2Seq,
    }[task]
    _refuse_pickled_weights(Path(directory))
    model = _loaded(
        # float32 whatever the checkpoint stores: transformers 5 loads a bf16 checkpoint (every Llama 3,
        # Qwen 2.5) as bf16 by default, and its cache wrapper's float32 past made the first call fail
        lambda: auto.from_pretrained(directory, local_files_only=True, trust_remote_code=False, use_safetensors=True,
                                     dtype=torch.float32),  # fmt: skip
        f"{directory} for {task}", directory, "MODEL must be a save_pretrained directory of a model that has this task",
    )  # fmt: skip
    return model.eval()


def _refuse_pickled_weights(directory: Path) -> None:
    pickled = sorted(p.name for p in directory.glob("*.bin"))
    if pickled and not any(directory.glob("*.safetensors")):
        raise ConfigError(
            f"{directory} holds its weights as pickles ({', '.join(pickled)}): loading a pickle can run code",
            where=str(directory / pickled[0]),
            hint="convert where you trust the file: Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)",
        )


def _loaded(load: Any, what: str, where: str, hint: str | None = None) -> Any:
    """``load()``, with any exception of transformers / safetensors / tokenizers as a ConfigError."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - their error types are many and undocumented; each is a bad directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ConfigError(f"cannot load {what}: {type(exc).__name__}: {first}".rstrip(": "), where=where,
                          hint=hint) from None  # fmt: skip


def inferred_task(directory: str) -> str:
    path = Path(directory) / "config.json"
    try:
        config = parse_json(path.read_text(encoding="utf-8"), str(path))
    except (OSError, ValueError, ArtifactError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}", where=str(path)) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a JSON object", where=str(path), hint="is this a save_pretrained directory?")
    architectures = config.get("architectures")
    if not isinstance(architectures, list):
        architectures = []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "text-generation"
    if config.get("is_encoder_decoder") and any(
        a.endswith("ForConditionalGeneration") for a in architectures
    ):
        return SPEECH_TASK if "num_mel_bins" in config else "text2text-generation"
    raise ConfigError(
        f"cannot tell the task of {directory} from its architectures {architectures}",
        where=str(path),
        hint=f"pass --task ({' or '.join(TASKS)})",
    )


def task_inputs(
    model: nn.Module, task: str, given: dict[str, torch.Tensor] | None, seed: int
) -> dict[str, torch.Tensor]:
    """Example inputs for ``task``: the given ones, else a prompt of :data:`EXAMPLE_TOKENS` random
    ordinary tokens with its attention mask. A text-generation model must be a causal LM with a cache."""
    fits = (causal_lm if task == "text-generation" else seq2seq).wants_cache(model, {"input_ids": None})
    if not fits:
        kind = "a causal LM" if task == "text-generation" else "an encoder-decoder LM"
        raise ConfigError(
            f"{type(model).__name__} is not {kind} with a KV cache: --task {task} does not apply",
            hint="drop --task to compile its forward as it is",
        )
    if task == SPEECH_TASK:
        return _speech_inputs(model, given, seed)
    if given:
        unknown = sorted(set(given) - {"input_ids", "attention_mask"})
        if unknown:
            raise InputError(
                f"--task {task} takes input_ids and attention_mask, not {unknown}",
                where=unknown[0],
                hint="e.g. --input input_ids=1x16:int64:VOCAB",
            )
        return given
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab < 4:
        raise InputError(
            f"{type(model).__name__}'s config has no vocab_size",
            hint="give --input input_ids=1x8:int64:VOCAB",
        )
    ids = torch.randint(3, vocab, (1, EXAMPLE_TOKENS), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _speech_inputs(model: nn.Module, given: dict[str, torch.Tensor] | None, seed: int) -> dict[str, torch.Tensor]:
    """The given input_features, else one clip of random log-mel frames at the encoder's length
    (Whisper's encoder takes exactly twice its source positions)."""
    if given:
        unknown = sorted(set(given) - {seq2seq.SPEECH})
        if unknown:
            raise InputError(
                f"--task {SPEECH_TASK} takes input_features, not {unknown}",
                where=unknown[0],
                hint="e.g. --input input_features=1x80x3000:float32",
            )
        return given
    config = getattr(model, "config", None)
    mels, positions = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if not isinstance(mels, int) or not isinstance(positions, int):
        raise InputError(
            f"{type(model).__name__}'s config has no num_mel_bins / max_source_positions",
            hint="give --input input_features=1xMELSxFRAMES:float32",
        )
    features = torch.randn(1, mels, 2 * positions, generator=torch.Generator().manual_seed(seed))
    return {seq2seq.SPEECH: features}


def load_tokenizer(directory: str) -> Any:
    """A transformers tokenizer from a local directory, or a one-line ConfigError naming it."""
    path = Path(directory)
    if not path.is_dir() or not any(
        (path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
    ):
        raise ConfigError(
            f"{directory} is not a tokenizer directory (no tokenizer.json or tokenizer_config.json)",
            where=directory,
            hint="pass the directory a tokenizer's save_pretrained wrote",
        )
    import transformers

    return _loaded(
        lambda: transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False),
        f"the tokenizer in {directory}", directory, "pass the directory a tokenizer's save_pretrained wrote",
    )  # fmt: skip
