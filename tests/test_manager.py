"""PassManager and its instruments: failures are reported in context, the report round-trips."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from torchkiln import models
from torchkiln.compiler.manager import PassManager
from torchkiln.compiler.passes import Pass, PassResult, parse_pass
from torchkiln.compiler.report import Report
from torchkiln.compiler.trace import trace
from torchkiln.errors import PassError


class LiesAboutModified(Pass):
    name = "test_liar"

    def run(self, program):
        graph = program.graph_module.graph
        first = next(iter(graph.nodes))
        with graph.inserting_after(first):
            graph.call_function(torch.relu, (first,))  # an (unused) change
        return PassResult(modified=False)


class BreaksNumerics(Pass):
    name = "test_breaker"

    def run(self, program):
        with torch.no_grad():
            next(program.graph_module.parameters()).mul_(2.0)
        return PassResult(modified=True)


class Crashes(Pass):
    name = "test_crash"

    def run(self, program):
        raise RuntimeError("boom")


def mlp_program():
    entry = models.get("mlp")
    return trace(entry.build(), entry.example_inputs(), frontend="fx")


def test_pass_that_lies_about_modified_is_caught():
    with pytest.raises(PassError, match="reported modified=False but changed the graph"):
        PassManager([LiesAboutModified()]).run(mlp_program())


def test_lossless_pass_that_changes_outputs_is_a_pass_error_in_context():
    with pytest.raises(PassError) as info:
        PassManager([parse_pass("cleanup"), BreaksNumerics()]).run(mlp_program())
    message = str(info.value)
    assert message.startswith(
        "while running test_breaker after [cleanup]: pass 'test_breaker' changed output 0"
    )
    assert "allowed" in message and "rtol=0.0001" in message


def test_lossy_pass_is_measured_not_rejected():
    class Lossy(BreaksNumerics):
        name = "test_lossy"
        lossless = False

    record = PassManager([Lossy()]).run(mlp_program())[0]
    assert record.max_abs_error > 1e-3


def test_crash_names_the_pass_and_what_ran_before():
    with pytest.raises(
        PassError, match=r"while running test_crash after \[cleanup, fold_batchnorm\]: RuntimeError: boom"
    ):
        PassManager([parse_pass("cleanup"), parse_pass("fold_batchnorm"), Crashes()]).run(mlp_program())


def test_invalid_graph_is_rejected():
    class Dangling(Pass):
        name = "test_dangling"

        def run(self, program):
            graph = program.graph_module.graph
            nodes = list(graph.nodes)
            last = nodes[-2]  # the node feeding the output
            with graph.inserting_after(nodes[0]):
                early = graph.call_function(torch.neg, (last,))  # uses a value before it exists
            nodes[-1].args = ((early,),)
            return PassResult(modified=True)

    with pytest.raises(PassError, match="left an invalid graph"):
        PassManager([Dangling()]).run(mlp_program())


def test_records_and_report_round_trip():
    program = mlp_program()
    records = PassManager([parse_pass("cleanup"), parse_pass("fold_batchnorm")]).run(program)
    cleanup, fold = records
    assert cleanup.op_delta == {"Dropout": -2} and fold.op_delta == {"BatchNorm1d": -2}
    assert fold.params_after == fold.params_before - 2 * (128 + 64)  # BN weight and bias are gone
    assert fold.seconds > 0 and fold.bytes_after < fold.bytes_before
    report = Report("mlp", program.flavour, passes=records)
    again = Report.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()
    table = report.table()
    assert "cleanup" in table and "BatchNorm1d -2" in table and "folded=2" in table


def test_notes_reach_the_table():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model[1].train()
    program = trace(model, torch.randn(1, 3, 5, 5), frontend="fx")
    records = PassManager([parse_pass("fold_batchnorm")], instruments=[]).run(program)
    assert (
        "note (fold_batchnorm): 1: not folded, BN is in training mode"
        in Report("m", "fx", passes=records).table()
    )
