"""``kiln inspect``: trace MODEL and show its op histogram, parameters and per-node shapes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from torchkiln.cli.common import add_model_arguments, example_inputs
from torchkiln.compiler import graph as G
from torchkiln.compiler.trace import trace
from torchkiln.workflows.loading import load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect", help="op histogram, parameters and shapes of MODEL's graph", description=__doc__
    )
    add_model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--nodes", action="store_true", help="list every node with its shape and dtype")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, entry = load_model(args.model)
    program = trace(model, example_inputs(args, entry), frontend=args.frontend)
    gm = program.graph_module
    params, nbytes = G.parameter_stats(gm)
    nodes = [
        {
            "name": n.name,
            "op": G.op_key(n, gm) or n.op,
            "target": str(n.target),
            "shape": list(G.shape_of(n) or []),
            "dtype": str(G.dtype_of(n) or "").removeprefix("torch."),
        }  # fmt: skip
        for n in gm.graph.nodes
    ]
    summary: dict[str, Any] = {
        "model": program.name,
        "flavour": program.flavour,
        "inputs": [s.to_dict() for s in program.inputs],
        "outputs": [s.to_dict() for s in program.outputs],
        "parameters": params,
        "parameter_bytes": nbytes,
        "ops": G.op_histogram(gm),
    }
    if args.json:
        print(json.dumps({**summary, "nodes": nodes} if args.nodes else summary, indent=2))
        return 0
    print(f"{program.name}: captured with {program.flavour}; {params:,} parameters ({nbytes / 1e6:.2f} MB)")
    for spec in program.inputs:
        print(f"  input  {spec.name}: {spec.dtype}{spec.pretty_shape()}")
    for spec in program.outputs:
        print(f"  output {spec.name}: {spec.dtype}{spec.pretty_shape()}")
    print("  ops:")
    for op, count in sorted(summary["ops"].items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"    {count:5d}  {op}")
    if args.nodes:
        print("  nodes:")
        for n in nodes:
            print(f"    {n['name']:32s} {n['op']:24s} {n['dtype']:8s} {n['shape']}")
    return 0
