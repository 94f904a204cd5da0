"""``stdlib_lm.trained``: the trained LM's cache entry is written whole through the destination
policy, loaded (never retrained) only when it is ours, and a directory that is not ours is refused
before any training."""

from __future__ import annotations

import pytest
import torch

from torchkiln.compiler import files
from torchkiln.errors import ArtifactError

stdlib_lm = pytest.importorskip("torchkiln.models.stdlib_lm")
pytest.importorskip("transformers", reason="transformers is a dev extra")


@pytest.fixture
def tiny_size(monkeypatch):
    text = stdlib_lm.corpus()[:60000]  # a slice of the corpus: the tokenizer trains in a second
    monkeypatch.setattr(stdlib_lm, "corpus", lambda: text)
    monkeypatch.setitem(stdlib_lm.SIZES, "test", dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=3,
                                                     batch=2))  # fmt: skip
    return "test"


def _must_not_train(*args, **kwargs):
    raise AssertionError("trained again: the cache entry was not used")


def test_a_trained_lm_is_cached_whole_then_loaded_without_training(tmp_path, tiny_size, monkeypatch):
    model, tokenizer, split = stdlib_lm.trained(tiny_size, cache=tmp_path)
    (entry,) = list(tmp_path.iterdir())
    assert entry.name.startswith("stdlib-test-") and files.is_ours(entry, "cache")
    assert (entry / "model.safetensors").is_file() and not any(p.suffix in (".bin", ".pt") for p in entry.iterdir())
    monkeypatch.setattr(stdlib_lm, "train", _must_not_train)
    again, tokenizer_again, split_again = stdlib_lm.trained(tiny_size, cache=tmp_path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert tokenizer_again("def f(x): return x")["input_ids"] == tokenizer("def f(x): return x")["input_ids"]
    assert torch.equal(split_again.held_out, split.held_out)
    # the same shape and corpus under another budget is another entry: never a stale model
    monkeypatch.setitem(stdlib_lm.SIZES, tiny_size, {**stdlib_lm.SIZES[tiny_size], "steps": 4})
    with pytest.raises(AssertionError, match="trained again"):
        stdlib_lm.trained(tiny_size, cache=tmp_path)


def test_a_directory_not_ours_at_the_entry_is_refused_before_training(tmp_path, tiny_size, monkeypatch):
    stdlib_lm.trained(tiny_size, cache=tmp_path / "first")
    (entry,) = list((tmp_path / "first").iterdir())
    mine = tmp_path / "second" / entry.name
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    (mine / "model.safetensors").write_bytes(b"not ours")  # even with the file a real entry has
    monkeypatch.setattr(stdlib_lm, "train", _must_not_train)
    with pytest.raises(ArtifactError):
        stdlib_lm.trained(tiny_size, cache=tmp_path / "second")
    assert sorted(p.name for p in mine.iterdir()) == ["model.safetensors", "notes.txt"]
    assert (mine / "notes.txt").read_text() == "mine"
