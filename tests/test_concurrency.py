"""A loaded artifact called from many threads at once, as behind a server: every caller gets its
own result, on every backend installed here (``Artifact`` docstring: a runtime object that serves
one call at a time comes from a ``Pool``)."""

from __future__ import annotations

import importlib.util
import threading
import warnings

import pytest
import torch
from conftest import compile_quietly, tiny_llama

import torchkiln
from torchkiln.backends.base import Memo, Pool
from torchkiln.models import MLP

THREADS, CALLS = 4, 25


def installed(backend: str, module: str) -> object:
    reason = f"backend {backend} needs the {module} package"
    return pytest.param(backend, marks=pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=reason))


BACKENDS = [installed("onnxruntime", "onnxruntime"), installed("openvino", "openvino"), "torch", "inductor"]


def from_threads(call, arguments: list) -> tuple[list, list[str]]:
    """``call`` on ``arguments`` from THREADS threads at once, each going round the list from its own
    start, CALLS times; returns (argument index, result) pairs in arrival order and the errors."""
    results: list = []
    errors: list[str] = []
    start = threading.Barrier(THREADS)

    def work(offset: int) -> None:
        start.wait()
        for step in range(CALLS):
            index = (offset * 7 + step) % len(arguments)
            try:
                results.append((index, call(arguments[index])))
            except Exception as exc:  # noqa: BLE001 - counted, then asserted empty
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results, errors


@pytest.fixture(scope="module")
def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_calling_one_loaded_artifact_each_get_their_own_outputs(mlp, backend, tmp_path):
    compiled = compile_quietly(mlp, torch.randn(2, 64), backend=backend, dynamic_axes={"x": {0: "batch"}})
    loaded = torchkiln.load(compiled.save(tmp_path / "artifact"), allow_native_code=backend == "inductor")
    inputs = [torch.randn(1 + i % 3, 64) for i in range(12)]  # batches of 1-3 around the example's 2
    serial = [loaded(x) for x in inputs]
    results, errors = from_threads(loaded, inputs)
    assert errors == []
    assert len(results) == THREADS * CALLS
    wrong = sum(not torch.equal(out, serial[index]) for index, out in results)
    assert wrong == 0, f"{wrong} of {len(results)} calls returned another call's outputs"


LM_BACKENDS = [installed("onnxruntime", "onnxruntime"), installed("openvino", "openvino"), "torch"]


#: OpenVINO's prompt step (a past of 0 positions) moves the logits ~1e-3 from call to call on some
#: CPUs (seen on a Xeon with AMX: 0.8-2.8e-3 from eager where ONNX Runtime is 9e-8), so a token whose
#: two best eager logits are that close may flip; any other difference is another call's tokens
NEAR_TIE = 1e-2


def same_or_near_tie(lm: torch.nn.Module, tokens: torch.Tensor, expected: torch.Tensor) -> bool:
    """``tokens`` equal ``expected``, or first differ where eager's logits for the two tokens are within NEAR_TIE."""
    if tokens.shape != expected.shape:
        return False
    differs = (tokens != expected).any(0).nonzero()
    if len(differs) == 0:
        return True
    at = int(differs[0])
    with torch.no_grad():
        logits = lm(expected[:, :at], use_cache=False).logits[:, -1]
    rows = torch.arange(len(tokens))
    return bool((logits[rows, tokens[:, at]] - logits[rows, expected[:, at]]).abs().max() < NEAR_TIE)


@pytest.mark.parametrize("backend", LM_BACKENDS)
def test_threads_generating_on_one_lm_each_get_their_own_tokens(backend):
    """The runtime-kept caches (ONNX Runtime in place, OpenVINO's stateful form) are per generation;
    the first generations also race to build that form and to check it against the graph."""
    prompt = torch.randint(3, 128, (1, 6))
    lm = tiny_llama()
    compiled = compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, backend=backend)
    prompts = [torch.randint(3, 128, (1, 4 + i % 3)) for i in range(6)]  # batch 1, as a server's requests
    serial = [compiled.generate(p, max_new_tokens=6) for p in prompts]
    fresh = compile_quietly(lm, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)},
                            backend=backend)  # its first generations are the concurrent ones  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a disagreement warning would mean the checks crossed
        results, errors = from_threads(lambda p: fresh.generate(p, max_new_tokens=6), prompts)
    assert errors == [] and len(results) == THREADS * CALLS
    wrong = [(index, tokens.tolist(), serial[index].tolist()) for index, tokens in results
             if not same_or_near_tie(lm, tokens, serial[index])]  # fmt: skip
    assert wrong == [], f"{len(wrong)} of {len(results)} generations differ from their serial run: {wrong[:2]}"


def test_a_pool_never_hands_one_object_to_two_callers_at_once():
    made: list[object] = []
    pool: Pool[object] = Pool(lambda: made.append(object()) or made[-1])
    held: set[int] = set()
    clash = threading.Event()
    lock = threading.Lock()

    def use(_: object) -> None:
        with pool.taken() as item:
            with lock:
                if id(item) in held:
                    clash.set()
                held.add(id(item))
            threading.Event().wait(0.001)
            with lock:
                held.discard(id(item))

    _, errors = from_threads(use, [None])
    assert errors == [] and not clash.is_set()
    assert 1 <= len(made) <= THREADS  # grown to the most calls at once, no further


def test_a_memo_makes_each_value_once_under_concurrent_first_use():
    memo: Memo[int] = Memo()
    calls: list[int] = []

    def make() -> int:
        calls.append(1)
        threading.Event().wait(0.01)  # slow enough that every thread arrives while it runs
        return 42

    results, errors = from_threads(lambda key: memo.get(key, make), ["a"])
    assert errors == [] and {value for _, value in results} == {42} and len(calls) == 1
