"""Decoder LMs nobody here wrote, compiled with their KV cache from ONE prompt (batch 1, the way a
user compiles an LM) and generating at other batches on ONNX Runtime: token for token what
transformers' greedy generate gives.

* **one prompt → batch 2**: compiled from a [1, 6] prompt without a mask (positions computed in the
  graph, batch 1: the case ONNX ``RotaryEmbedding`` broke), generating 8 tokens for a batch of two
  other prompts.
* **one prompt + mask → left-padded batch 3**: compiled from a [1, 6] prompt with its mask,
  generating for a batch of three prompts left-padded to different lengths; saved and loaded, the
  same tokens.

A state-space LM (Mamba) is compiled as one step over its states and runs the prompt through it
token by token (torchkiln.compiler.state_space).

docs/coverage.md's "Generation coverage" table is this test's output (``make coverage`` rewrites it, see
tests/coverage_table.py). One model per family runs in CI (``Generator.ci``: the padded case; the
maskless one on Falcon, whose rotary positions are computed in the graph), the rest are ``slow``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compile_quietly
from coverage_models import GENERATORS, VOCAB, Generator
from coverage_table import Table

import torchkiln

pytest.importorskip("transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')")

CASES = ("one prompt → batch 2", "one prompt + mask → left-padded batch 3")
TABLE = Table("generation-coverage", [(g.name, g.family) for g in GENERATORS], CASES, "coverage")
NEW = 8


@pytest.fixture(scope="module", autouse=True)
def readme_table():
    yield
    TABLE.finish()


def _params(case: str) -> list:
    """CI runs one model per family: the maskless case only where positions are computed in the graph
    (Falcon: rotary), the padded case on every CI model."""
    return [
        pytest.param(g, id=g.name, marks=() if g.ci and (case == "mask" or g.name == "falcon") else pytest.mark.slow)
        for g in GENERATORS
    ]


def _theirs(lm: torch.nn.Module, prompt: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    with torch.no_grad():
        out = lm.generate(prompt, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, num_beams=1)
    return out.tolist()


def _left_padded(lengths: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) >= torch.tensor([[width - n] for n in lengths])).long()
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("gen", _params("one prompt"))
def test_compiled_from_one_prompt_generates_at_batch_2(gen: Generator):
    lm = gen.build()
    compiled = compile_quietly(lm, {"input_ids": _prompt()}, backend="onnxruntime")
    batch = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    ours = compiled.generate(batch, max_new_tokens=NEW, min_new_tokens=NEW)
    assert ours.tolist() == _theirs(lm, batch, torch.ones_like(batch))
    TABLE.record(gen.name, CASES[0], "✓")


@pytest.mark.parametrize("gen", _params("mask"))
def test_compiled_from_one_prompt_with_a_mask_generates_a_left_padded_batch(gen: Generator, tmp_path):
    lm = gen.build()
    prompt = _prompt()
    compiled = compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, backend="onnxruntime")
    padded, mask = _left_padded((7, 4, 6), seed=3)
    ours = compiled.generate(padded, mask, max_new_tokens=NEW, min_new_tokens=NEW)
    assert ours.tolist() == _theirs(lm, padded, mask)
    # the shortest row generates what it generates alone: its padding was masked, not attended
    alone = compiled.generate(padded[1:2, 3:], max_new_tokens=NEW, min_new_tokens=NEW)
    assert alone[0, 4:].tolist() == ours[1, 7:].tolist()
    loaded = torchkiln.load(compiled.save(tmp_path / gen.name))  # the manifest keeps what generation needs
    assert loaded.generate(padded, mask, max_new_tokens=NEW, min_new_tokens=NEW).tolist() == ours.tolist()
    TABLE.record(gen.name, CASES[1], "✓")


def _prompt() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
