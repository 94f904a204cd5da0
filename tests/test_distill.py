"""Distillation: recovering accuracy after structured pruning and low rank on real data, the
public API, determinism, and two processes under torchrun."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import compile_quietly
from torch import nn

import torchkiln
from torchkiln.errors import ConfigError, InputError
from torchkiln.models.digits import accuracy


@pytest.fixture
def digits(trained_digits_cnn):
    teacher, data = trained_digits_cnn
    # early stopping looks at a validation split of the training data, never at the test split
    n = len(data.x_train) - 200
    train = [(data.x_train[i : min(i + 64, n)], data.y_train[i : min(i + 64, n)]) for i in range(0, n, 64)]
    val = [(data.x_train[n:], data.y_train[n:])]
    return teacher, data, train, val


def linear_params(module: nn.Module) -> int:
    gm = module.artifact.module
    return sum(p.numel() for n, p in gm.named_parameters() if p.dim() == 2)


@pytest.mark.slow  # ~1 min in CI; docs/passes.md's distillation example (run in CI) asserts the same within one point
def test_half_the_channels_then_distillation_loses_at_most_one_point(digits):
    teacher, data, train, val = digits
    before = accuracy(teacher, data.x_test, data.y_test)
    pruned = compile_quietly(
        teacher, data.x_test[:1], passes="fold_batchnorm,prune:structured=true,ratio=0.5",
        dynamic_axes="batch", backend="torch",
    )  # fmt: skip
    recovered = compile_quietly(
        teacher, data.x_test[:1], passes="fold_batchnorm,prune:structured=true,ratio=0.5,distill:epochs=8,lr=0.003",
        dynamic_axes="batch", train_data=train, val_data=val,
    )  # fmt: skip
    assert accuracy(pruned, data.x_test, data.y_test) < before - 5  # pruning alone hurts...
    assert before - accuracy(recovered, data.x_test, data.y_test) <= 1.0  # ...distillation wins it back
    assert recovered.report.params < 0.5 * recovered.report.passes[0].params_before


@pytest.mark.slow  # ~35 s: two 8-epoch fine-tunes; CI keeps the refusal test and docs/passes.md's distillation run
def test_group_lasso_fine_tune_makes_half_the_channels_removable(digits):
    """The group-lasso term during distillation pushes whole channels toward zero, so the structured
    pruning after it loses far less than after the same fine-tune without it (no recovery after)."""
    teacher, data, train, val = digits
    results = {}
    for lasso in (0.0, 0.3):
        compiled = compile_quietly(
            teacher, data.x_test[:1], passes=f"fold_batchnorm,distill:epochs=8,lr=0.003,group_lasso={lasso},"
            "prune:structured=true,ratio=0.5", dynamic_axes="batch", backend="torch", train_data=train, val_data=val,
            verify=False,
        )  # fmt: skip
        results[lasso] = (accuracy(compiled, data.x_test, data.y_test), compiled.report.passes[1])
    (plain, plain_record), (lasso, record) = results[0.0], results[0.3]
    assert lasso >= 90.0 and lasso >= plain + 8.0, (plain, lasso)
    assert record.stats["lasso_groups"] >= 2 and record.stats["lasso_shrunk"] > 0
    assert "lasso_groups" not in plain_record.stats
    assert record.stats["best_epoch"] == record.stats["epochs"]  # the penalized run keeps its last (sparsest) epoch


def test_group_lasso_without_a_prunable_group_is_refused():
    model = nn.Sequential(nn.Linear(4, 3)).eval()  # its only channels are the graph's output
    with pytest.raises(ConfigError, match="distill:group_lasso=0.1 .*no channel group structured pruning could shrink"):
        compile_quietly(model, torch.randn(2, 4), passes="distill:group_lasso=0.1", train_data=[torch.randn(8, 4)])
    with pytest.raises(ConfigError, match="group_lasso"):
        compile_quietly(model, torch.randn(2, 4), passes="distill:group_lasso=-1", train_data=[torch.randn(8, 4)])


@pytest.mark.slow  # ~1 min in CI; lowrank's own tests (test_lowrank.py) stay in CI
def test_svd_to_half_the_linear_parameters_then_distillation_loses_at_most_one_point(digits):
    teacher, data, train, val = digits
    before = accuracy(teacher, data.x_test, data.y_test)
    dense = compile_quietly(teacher, data.x_test[:1], passes="fold_batchnorm", backend="torch")
    recovered = compile_quietly(
        teacher, data.x_test[:1], passes="fold_batchnorm,lowrank:rank_ratio=0.25,conv=off,distill:epochs=8,lr=0.003",
        dynamic_axes="batch", train_data=train, val_data=val, backend="torch",
    )  # fmt: skip
    assert linear_params(recovered) <= 0.5 * linear_params(dense)
    assert before - accuracy(recovered, data.x_test, data.y_test) <= 1.0


def test_public_api_is_deterministic_and_keeps_the_best_epoch():
    torch.manual_seed(1)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [torch.randn(16, 8) for _ in range(6)]

    def run() -> torchkiln.passes.distill.DistillResult:
        torch.manual_seed(2)
        student = nn.Sequential(nn.Linear(8, 4))
        return torchkiln.distill(student, teacher, data, val_data=data[:2], epochs=3, optimizer="sgd", lr=0.05,
                                 warmup_steps=2, progress=False)  # fmt: skip

    first, second = run(), run()
    for a, b in zip(first.student.parameters(), second.student.parameters()):
        assert torch.equal(a, b)
    scores = [h["score"] for h in first.history]
    assert first.best_epoch == scores.index(max(scores)) and scores[-1] > scores[0]


def test_distill_needs_training_data():
    with pytest.raises(InputError, match="distill needs training data"):
        compile_quietly(nn.Linear(4, 2), torch.randn(1, 4), passes="distill")


@pytest.mark.parametrize(
    ("options", "message"),
    [({"epochs": 0}, "must be >= 1"), ({"alpha": 2}, r"must be in \[0, 1\]"), ({"optimizer": "lion"}, "not one of")],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        torchkiln.distill(nn.Linear(2, 2), nn.Linear(2, 2), [torch.randn(1, 2)], **options)


def test_empty_training_data_is_an_error():
    with pytest.raises(torchkiln.InputError, match="training data for distillation is empty"):
        torchkiln.distill(nn.Linear(2, 2), nn.Linear(2, 2), [], progress=False)


SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    import torchkiln

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    data = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    result = torchkiln.distill(student, teacher, data, epochs=4, lr=0.01, progress=False)
    flat = torch.cat([p.detach().flatten() for p in result.student.parameters()])
    torch.save({"rank": dist.get_rank(), "world": dist.get_world_size(), "weights": flat,
                "loss": [h["train_loss"] for h in result.history]}, f"{sys.argv[1]}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
    """
)


def test_two_processes_with_torchrun(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])  # DDP keeps the replicas identical
    assert ranks[0]["loss"][-1] < ranks[0]["loss"][0]
