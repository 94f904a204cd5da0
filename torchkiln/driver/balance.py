"""What a cut balances: a cost per activation (weight bytes, output bytes, or measured time), and
the cut positions that split that cost evenly among the legal ones."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import fx

from torchkiln.driver.cuts import Program, tensor_bytes
from torchkiln.errors import ConfigError


def _reads(program: Program, node: fx.Node) -> list[fx.Node]:
    """``node``'s inputs with the constants it reads expanded to what they read (weights, literals)."""
    result, stack = [], list(node.all_input_nodes)
    while stack:
        arg = stack.pop()
        result.append(arg)
        if program.kinds.get(arg) == "constant":
            stack.extend(arg.all_input_nodes)
    return result


def node_costs(program: Program, balance: str, flat: tuple[torch.Tensor, ...], repeats: int = 7) -> list[float]:
    """Cost of each activation by ``balance`` (see the module docstring); ``latency``: the median of
    ``repeats`` timed runs after two warm-up runs, a constant's time charged to its first reader."""
    gm = program.gm
    if balance != "latency":
        weights = [float(_weight_bytes(gm, n, program)) for n in program.order]
        if balance == "memory":
            weights = [w + tensor_bytes(program.values.get(n.name)) for w, n in zip(weights, program.order)]
        return weights
    runs: dict[str, list[float]] = {n.name: [] for n in gm.graph.nodes}

    class Timer(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            start = time.perf_counter()
            result = super().run_node(n)
            runs[n.name].append(time.perf_counter() - start)
            return result

    with torch.no_grad():
        for _ in range(2 + repeats):
            Timer(gm).run(*flat)
    seconds = {name: statistics.median(times[2:]) if len(times) > 2 else 0.0 for name, times in runs.items()}
    costs = {n: seconds[n.name] for n in program.order}
    charged: set[fx.Node] = set()
    for node in program.order:
        for arg in _reads(program, node):
            if program.kinds.get(arg) == "constant" and arg not in charged:
                charged.add(arg)
                costs[node] += seconds[arg.name]
    return [costs[n] for n in program.order]


def _weight_bytes(gm: fx.GraphModule, node: fx.Node, program: Program) -> int:
    """Bytes of the weights ``node`` reads, directly or through constants (an int8 weight's
    dequantize counts its int8 tensor, scale and zero point)."""
    total = 0
    for arg in {a for a in _reads(program, node) if a.op == "get_attr"}:
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        total += tensor_bytes(value)
    if node.op == "call_module":
        total += sum(p.numel() * p.element_size() for p in gm.get_submodule(str(node.target)).parameters())
    return total


def choose_cuts(program: Program, costs: list[float], stages: int) -> list[int]:
    """N-1 legal cut positions into the program's activations: near each k/N share of the total
    cost, the fewest boundary bytes within 10% of a stage's share of the target."""
    order = program.order
    if stages > len(order):
        raise ConfigError(f"{stages} stages asked of a program with {len(order)} compute nodes", where="stages")
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    total = prefix[-1] or 1.0
    crossing = program.legal()
    cuts: list[int] = []
    for k in range(1, stages):
        target, slack = total * k / stages, 0.1 * total / stages
        low = (cuts[-1] + 1) if cuts else 1
        valid = [p for p in range(low, len(order) - (stages - k) + 1) if p in crossing]
        if not valid:
            reason = program.cut_reason(low) if low < len(order) else "the program ends"
            raise ConfigError(
                f"no legal cut for stage {k}: every position crosses a value a stage cannot receive "
                f"(at node {low}: {reason})", where="stages", hint="use fewer stages",
            )  # fmt: skip
        near = [p for p in valid if abs(prefix[p] - target) <= slack]
        best = min(near, key=lambda p: (crossing[p], abs(prefix[p] - target))) if near else min(
            valid, key=lambda p: abs(prefix[p] - target)
        )  # fmt: skip
        cuts.append(best)
    return cuts


def median_seconds(fn: Any, args: tuple[Any, ...], repeats: int = 9, **kwargs: Any) -> float:
    return statistics.median(timings(fn, args, repeats, **kwargs))


def timings(fn: Any, args: tuple[Any, ...], repeats: int, **kwargs: Any) -> list[float]:
    times = []
    with torch.no_grad():
        for i in range(2 + repeats):
            start = time.perf_counter()
            fn(*args, **kwargs)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return times
