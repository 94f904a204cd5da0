from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import torchkiln
from torchkiln import models
from torchkiln.compiler.passes import Pass, PassResult

# Two xdist workers on a 2-core machine each ran torch's and oneDNN's default of one thread per core:
# four busy threads on two cores. Each worker (and what it starts: kiln commands, torchrun ranks)
# gets its share of the cores instead.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
    torch.set_num_threads(_THREADS)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Modules that train a model once (``xdist_group``) rely on ``--dist loadgroup`` sending them to
    one worker; pytest 9.2 with pytest-xdist 3.8 silently stops grouping (pytest-dev/pytest-xdist#1386)
    and every such module then trains on both workers. Fail those tests rather than lose minutes quietly."""
    grouping = getattr(item.config.option, "loadgroup", False)  # set on xdist workers under --dist loadgroup
    if grouping and item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
        pytest.fail(
            f"--dist loadgroup is not grouping (no @group suffix on this test's id): pytest {pytest.__version__} "
            "with this pytest-xdist ignores xdist_group; install 'pytest<9.2' (the dev extra pins it)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> None:
    """kiln build caches by default; tests must not read or fill the user's ~/.cache."""
    monkeypatch.setenv("TORCHKILN_CACHE_DIR", str(tmp_path_factory.mktemp("kiln-cache")))


@pytest.fixture(scope="session")
def _trained_digits_cnn(tmp_path_factory):
    """The reference digits CNN (seed 0), trained once per test run: the first pytest-xdist worker
    to get here trains it and saves its weights where the others of this run look (a lock between)."""
    from filelock import FileLock

    from torchkiln.models.digits import DigitsCNN, load_digits_split, train_digits

    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # this run's, shared by its workers
    path = root / "digits_cnn.pt"
    data = load_digits_split()
    with FileLock(f"{path}.lock"):
        torch.manual_seed(0)
        model = DigitsCNN()
        if path.exists():
            model.load_state_dict(torch.load(path, weights_only=True))
            model.eval()
        else:
            model = train_digits(model, data)
            torch.save(model.state_dict(), path)
    return model, data


@pytest.fixture
def trained_digits_cnn(_trained_digits_cnn):
    """``(model, data)``: a private copy of the run's trained digits CNN and the digits split."""
    model, data = _trained_digits_cnn
    return copy.deepcopy(model), data


def compile_quietly(model: nn.Module, inputs, **kwargs) -> torchkiln.CompiledModel:
    """compile() without the latency measurement (tests never time anything)."""
    kwargs.setdefault("latency_runs", 0)
    return torchkiln.compile(model, inputs, **kwargs)


class Perturb(Pass):
    """A lossy pass promising nothing: adds 0.05 to every parameter (module calls stay, so BN still
    folds). The manager measures it; the artifact then differs from eager."""

    name = "test_perturb"
    lossless = False

    def run(self, program):
        with torch.no_grad():
            for parameter in program.graph_module.parameters():
                parameter.add_(0.05)
        return PassResult(modified=True)


def op_count(gm, key: str) -> int:
    from torchkiln.compiler.graph import op_histogram

    return op_histogram(gm).get(key, 0)


SMALL_ZOO = models.small_models()
# The secondary per-pass sweeps (cluster, compare, lowrank, prune) to ONNX Runtime: mobilenet_v2, the
# slowest export (12-20 s a case), runs there only under `slow`; backends, quantize and fp16 keep it in CI.
SWEEP_ZOO = [pytest.param(n, marks=pytest.mark.slow) if n == "mobilenet_v2" else n for n in SMALL_ZOO]


def tiny_llama() -> nn.Module:
    """A 2-layer Llama with grouped heads (4 query, 2 KV), vocabulary 128, seeded."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def generates_like(lm: nn.Module, compiled, new: int = 5) -> None:
    """Batch 2, the same left-padded, then one prompt: each equals transformers' greedy generation
    (a batch of another size after a generation starts from its own empty cache)."""
    ids = torch.randint(3, 128, (2, 7))
    mask = torch.ones_like(ids)
    padded = mask.clone()
    padded[1, :3] = 0
    for batch, attention in ((ids, mask), (ids, padded), (ids[:1], mask[:1])):
        expected = lm.generate(batch, attention_mask=attention, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        assert torch.equal(compiled.generate(batch, attention, max_new_tokens=new, min_new_tokens=new), expected)


def count_runs(monkeypatch, cls) -> list[int]:
    """A list that grows by one at every ``cls.run`` call (the call itself unchanged)."""
    counted: list[int] = []
    run = cls.run
    monkeypatch.setattr(cls, "run", lambda self, inputs: counted.append(1) or run(self, inputs))
    return counted


def fit_digits(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """``model`` trained full-batch with Adam on the first 1400 digits (cross-entropy), in eval mode;
    held-out top-1 on the rest must pass 90% (trained, not random weights)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1400]), y[:1400]).backward()
        optimizer.step()
    model.eval()
    accuracy = (model(x[1400:]).argmax(1) == y[1400:]).float().mean().item()
    assert accuracy > 0.9, accuracy
    return model
