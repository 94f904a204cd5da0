"""``kiln bench``: runtimes side by side with percentiles, throughput, memory, size and ratios to
eager; artifacts with fixed and dynamic batch; bad arguments exit 2. Nothing here asserts speed."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from torchkiln.cli import main
from torchkiln.driver.benchmark import Latency, PeakMemory, interleaved_times
from torchkiln.workflows import bench


def bench_json(capsys, *argv: str) -> dict:
    assert main(["bench", *argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_model_is_timed_on_every_runtime_and_batch_size(tmp_path, capsys):
    plot = tmp_path / "throughput.png"
    report = bench_json(capsys, "mlp", "--runtimes", "eager,ort-fp32,ort-int8", "--batch-sizes", "1,4",
                        "--runs", "3", "--plot", str(plot))  # fmt: skip
    timed = [r for r in report["rows"] if r["latency"]]
    assert {(r["runtime"], r["batch"]) for r in timed} == {(rt, b) for rt in ("eager", "ort-fp32", "ort-int8") for b in (1, 4)}
    for row in timed:
        latency = row["latency"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] and latency["runs"] == 3
        assert row["throughput"] == pytest.approx(row["batch"] / latency["p50"] * 1e3)
        assert row["size_mb"] > 0 and row["vs_eager"] > 0
    assert all(r["vs_eager"] == 1.0 for r in timed if r["runtime"] == "eager")
    int8, fp32 = (next(r for r in timed if r["runtime"] == name) for name in ("ort-int8", "ort-fp32"))
    assert int8["size_mb"] < 0.5 * fp32["size_mb"]  # int8 weights: about a quarter of the file
    assert plot.read_bytes()[:4] == b"\x89PNG" and report["plot"] == f"wrote {plot}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_by_default_every_cpu_runtime_and_the_gpu_ones_are_listed_as_skipped(capsys, monkeypatch):
    """Without openvino its rows say so (with it they are timed: tests/test_openvino.py)."""
    monkeypatch.setattr(bench, "_has_openvino", lambda: False)
    report = bench_json(capsys, "mlp", "--runs", "3")
    timed = {r["runtime"] for r in report["rows"] if r["latency"]}
    assert timed == {"eager", "torch.compile", "ort-fp32", "ort-int8"}
    skipped = {r["runtime"]: r["note"] for r in report["rows"] if not r["latency"]}
    assert skipped == {
        **dict.fromkeys(("eager-cuda", "torch-cuda-fp16", "tensorrt-fp16", "tensorrt-int8"), "skipped: no CUDA device"),
        **dict.fromkeys(("openvino-fp32", "openvino-int8"), "skipped: openvino is not installed"),
    }
    assert report["machine"].startswith("CPU: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_table_fits_120_columns_and_groups_what_was_not_timed(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_has_openvino", lambda: False)
    assert main(["bench", "mlp", "--runs", "3", "--runtimes", "eager,ort-fp32,tensorrt-fp16", "--quiet"]) == 0
    main(["bench", "mlp", "--runs", "3", "--quiet"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU: ") and max(len(line) for line in lines) <= 120, lines
    assert any(line.startswith("  not timed: eager-cuda, torch-cuda-fp16, tensorrt-fp16, tensorrt-int8: skipped: no CUDA")
               for line in lines)  # fmt: skip
    assert any(line.startswith("  not timed: tensorrt-fp16 b1: failed: BackendError") for line in lines)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_a_runtime_that_cannot_be_built_is_a_row_saying_why(capsys):
    report = bench_json(capsys, "mlp", "--runtimes", "eager,tensorrt-fp16,torch-cuda-fp16", "--runs", "3")
    notes = {r["runtime"]: r["note"] for r in report["rows"] if not r["latency"]}
    assert notes["tensorrt-fp16"].startswith("failed: BackendError: the tensorrt backend needs")
    assert notes["torch-cuda-fp16"].startswith("failed: BackendError: backend option device=cuda")


def test_an_artifact_is_timed_with_its_eager_model(tmp_path, capsys):
    assert main(["export", "mlp", "--dynamic-batch", "-o", str(tmp_path / "dyn")]) == 0
    assert main(["export", "mlp", "-o", str(tmp_path / "fixed")]) == 0
    capsys.readouterr()
    report = bench_json(capsys, str(tmp_path / "dyn"), "--model", "mlp", "--batch-sizes", "1,2", "--runs", "3")
    assert {(r["runtime"], r["batch"]) for r in report["rows"] if r["latency"]} == {
        ("artifact (onnxruntime)", 1), ("artifact (onnxruntime)", 2), ("eager", 1), ("eager", 2)}  # fmt: skip
    report = bench_json(capsys, str(tmp_path / "fixed"), "--batch-sizes", "1,2", "--runs", "3")
    skipped = [r for r in report["rows"] if not r["latency"]]
    assert [r["batch"] for r in skipped] == [2] and "fixed at 1" in skipped[0]["note"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-sizes", "0"], "bad --batch-sizes '0'"),
        (["--batch-sizes", "a,b"], "bad --batch-sizes 'a,b'"),
        (["--runtimes", "eager,tvm"], "unknown runtime(s) tvm"),
        (["--runs", "0"], "--runs must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_exit_2(capsys, argv, message):
    assert main(["bench", "mlp", *argv]) == 2
    assert message in capsys.readouterr().err


def test_nearest_rank_percentiles():
    latency = Latency.of([float(v) for v in range(100, 0, -1)])
    assert (latency.p50, latency.p90, latency.p99, latency.runs) == (50.0, 90.0, 99.0, 100)
    assert Latency.of([3.0]) == Latency(3.0, 3.0, 3.0, 1)


def test_interleaved_times_alternates_blocks():
    order: list[str] = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, runs=4, block=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4}
    assert order[:5] == ["a"] * 5 and order[5:10] == ["b"] * 5  # 3 untimed warm-up calls + 2 timed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_sees_an_allocation():
    peak = PeakMemory()
    with peak.measure():
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, written so the pages are resident
        del block
    assert peak.growth_bytes is not None and peak.growth_bytes >= 32 * 2**20


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_generate_never_prints_a_negative_or_noise_decode_rate():
    """A tiny model's decode steps can take less time than the noise in timing the prompt: the rate
    was printed negative (bench_generate --size tiny). It is now not measured, and says so."""
    import math

    script = _bench_script("bench_generate")
    assert script.decode_rate(1, 16, whole=0.010, one=0.002) == pytest.approx(15 / 0.008)
    assert math.isnan(script.decode_rate(1, 16, whole=0.010, one=0.011))  # negative difference
    assert math.isnan(script.decode_rate(1, 16, whole=0.010, one=0.0095))  # 5% of the whole: noise
    assert math.isnan(script.decode_rate(8, 1, whole=0.010, one=0.002))  # no decode step to time
    rows = [("tiny", 1, "HF eager", 1.0, 100.0), ("tiny", 1, "torchkiln fp32", 1.0, math.nan)]
    text = script.table(rows)
    assert "| tiny | 1 | torchkiln fp32 | 1.0 | - | - |" in text and "not measurable" in text and "nan" not in text


transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'torchkiln[hf]')"
)


@pytest.fixture(scope="module")
def cached_llama(tmp_path_factory):
    from tests.conftest import compile_quietly, tiny_llama

    lm = tiny_llama()
    ids = torch.randint(3, 128, (1, 6))
    directory = tmp_path_factory.mktemp("bench-lm") / "artifact"
    compile_quietly(lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}).save(directory)
    return lm, directory


def test_a_cached_lm_artifact_is_timed_as_prefill_and_decode_beside_its_eager_model(cached_llama):
    """Random inputs of the specs were a mask and a cache that disagree (ONNX Runtime: 'GatherND invalid
    index'); now each batch is a prefill over an empty cache and one decode step over the prefill's."""
    lm, directory = cached_llama
    result = bench.bench_artifact(directory, eager_model=lm, batch_sizes=[1, 3], runs=3, prompt_length=7)
    timed = {(r.runtime, r.batch) for r in result.rows if r.latency}
    phases = ("prefill 7", "decode @7")
    assert timed == {
        (f"{who} {p}", b) for who in ("artifact (onnxruntime)", "eager") for p in phases for b in (1, 3)
    }
    ratios = {r.runtime: r.vs_eager for r in result.rows if r.batch == 1}
    assert ratios["eager decode @7"] == 1.0 and ratios["artifact (onnxruntime) decode @7"] > 0


def test_the_decode_step_bench_times_is_the_one_generation_runs(cached_llama):
    from torchkiln.driver.compiled import load
    from torchkiln.driver.generate import empty_past, lm_steps

    lm, directory = cached_llama
    compiled = load(directory)
    ids = torch.randint(3, 128, (2, 9))
    _, decode = lm_steps(compiled, [s.name for s in compiled.inputs], empty_past(compiled, 2), ids)
    assert decode["past_key_0"].shape[2] == 8 and decode["attention_mask"].shape == (2, 9)
    with torch.no_grad():
        expected = lm(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(compiled(**decode)["logits"][:, -1], expected, atol=1e-4, rtol=1e-4)


def test_a_mask_that_does_not_span_past_and_sequence_is_refused_by_name(cached_llama):
    from torchkiln.driver.compiled import load
    from torchkiln.driver.generate import empty_past, lm_steps
    from torchkiln.errors import InputError

    _, directory = cached_llama
    compiled = load(directory)
    _, decode = lm_steps(
        compiled, [s.name for s in compiled.inputs], empty_past(compiled, 1), torch.randint(3, 128, (1, 4))
    )
    with pytest.raises(
        InputError, match=r"'attention_mask' has 2 on axis 1 \(past\+sequence\).*past 3 \+ sequence 1 = 4"
    ):
        compiled(**{**decode, "attention_mask": decode["attention_mask"][:, :2]})


def test_a_prompt_longer_than_the_positions_exits_2(cached_llama, capsys):
    _, directory = cached_llama
    assert main(["bench", str(directory), "--prompt-length", "64", "--quiet"]) == 2
    assert (
        "a prompt of 64 tokens and one decoded token exceed the model's 64 positions"
        in capsys.readouterr().err
    )
    assert main(["bench", str(directory), "--prompt-length", "0", "--quiet"]) == 2
