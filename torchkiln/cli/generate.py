"""``kiln generate``: generate tokens with an artifact compiled with its KV cache (``kiln export
--task text-generation``), printing them as they come and the decode speed at the end."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

import torchkiln
from torchkiln.cli.common import add_native_code_argument
from torchkiln.driver.generate import MAX_NEW_TOKENS, SPEECH, check_settings, vocabulary
from torchkiln.errors import InputError
from torchkiln.workflows import tasks


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate", help="generate text with a text-generation artifact", description=__doc__
    )
    parser.add_argument(
        "artifact", metavar="ARTIFACT", help="artifact directory (kiln export --task text-generation)"
    )
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs --tokenizer); this or --prompt-ids is required")
    prompt.add_argument("--prompt-ids", metavar="IDS",
                        help="prompt token ids, comma-separated: 1,2,3; this or --prompt is required")  # fmt: skip
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="a local Hugging Face tokenizer directory (default: none; tokens print as ids)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help=f"stop after this many new tokens (default: {MAX_NEW_TOKENS}, as generate() in Python)")  # fmt: skip
    parser.add_argument("--min-new-tokens", type=int, default=0,
                        help="the end-of-sequence token is not picked before this many (default: 0)")  # fmt: skip
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="with --do-sample: divide the logits by this; < 1 sharpens (default: 1.0)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=0,
                        help="with --do-sample: sample among the k likeliest tokens; 0 = all (default: 0)")  # fmt: skip
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="with --do-sample: sample among the likeliest tokens whose probabilities sum to p "
                        "(default: 1.0 = all)")  # fmt: skip
    parser.add_argument("--seed", type=int, help="seed for sampling, for reproducible output (default: none)")
    add_native_code_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.prompt is not None and not args.tokenizer:
        raise InputError(
            "--prompt needs --tokenizer DIR", where="--prompt", hint="or give --prompt-ids 1,2,3"
        )
    tokenizer = tasks.load_tokenizer(args.tokenizer) if args.tokenizer else None
    compiled = torchkiln.load(args.artifact, allow_native_code=args.allow_native_code)
    encoder = getattr(compiled, "encoder", None)
    if encoder is not None and any(spec.name == SPEECH for spec in encoder.inputs):
        raise InputError(
            f"{args.artifact} is a speech model: it generates from audio features, not a text prompt",
            where=args.artifact,
            hint="call torchkiln.load(...).generate(input_features) from Python (features from the model's "
            "feature extractor)",
        )
    vocab = vocabulary(compiled)
    if tokenizer is not None and vocab is not None and len(tokenizer) > vocab:
        raise InputError(
            f"the tokenizer in {args.tokenizer} has {len(tokenizer)} tokens, the model only {vocab}",
            where=args.tokenizer,
            hint="pass the tokenizer the model was trained with",
        )
    ids = _prompt_ids(args, tokenizer, vocab)
    check_settings(compiled, dict(  # before the prompt is printed; generate() checks them again
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        eos_token_id=None, pad_token_id=None,
    ))  # fmt: skip
    printer = _Printer(tokenizer, ids[0].tolist())
    start = time.perf_counter()
    compiled.generate(
        ids, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.do_sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=printer,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # the steps the loop made, not the output's length less the prompt's: an encoder-decoder returns
    # the decoder's sequence (its start tokens and the new ones), which the prompt's length does not measure
    new = printer.steps
    print(flush=True)
    print(
        f"kiln: {new} tokens in {seconds:.2f} s ({new / seconds:.1f} tokens/s, prompt {ids.shape[1]} tokens)",
        file=sys.stderr,
    )
    return 0


def _prompt_ids(args: argparse.Namespace, tokenizer: Any, vocab: int | None) -> torch.Tensor:
    if args.prompt is not None:
        ids = tokenizer(args.prompt)["input_ids"]
        if not ids:
            raise InputError("the prompt is empty after tokenization", where="--prompt")
        return torch.tensor([ids])
    try:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise InputError(
            f"bad --prompt-ids '{args.prompt_ids}'", where="--prompt-ids", hint="write 1,2,3"
        ) from None
    bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
    if not ids or bad:
        raise InputError(
            f"bad --prompt-ids '{args.prompt_ids}'"
            + (f": {bad} outside the vocabulary [0, {vocab})" if bad else ""),
            where="--prompt-ids",
        )
    return torch.tensor([ids])


class _Printer:
    """Prints each new token as it comes: text through the tokenizer (the decoded suffix, so that
    multi-token characters appear whole), else the token id."""

    def __init__(self, tokenizer: Any, prompt: list[int]):
        self.tokenizer, self.tokens, self.steps = tokenizer, list(prompt), 0
        self.shown = len(tokenizer.decode(prompt)) if tokenizer is not None else 0
        if tokenizer is not None:  # the prompt first, then each token as it comes
            print(tokenizer.decode(prompt), end="", flush=True)
        else:
            print(" ".join(map(str, prompt)), end=" | ", flush=True)

    def __call__(self, step: torch.Tensor) -> None:
        self.steps += 1
        token = int(step[0])
        self.tokens.append(token)
        if self.tokenizer is None:
            print(token, end=" ", flush=True)
            return
        text = self.tokenizer.decode(self.tokens)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next byte
            print(text[self.shown :], end="", flush=True)
            self.shown = len(text)
