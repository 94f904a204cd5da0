"""Random valid models for differential testing: a JSON-able spec and the module built from it.

A :class:`ModelSpec` is a DAG: its inputs are values 0..k-1 and each layer appends one value
computed from earlier ones. Shapes are tracked while generating (see ``strategies.py``), so every
spec is valid by construction. The spec, not the module, is what hypothesis draws and shrinks,
and what a regression file stores.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]  # without the batch dimension
    dtype: str = "float32"  # or "int64" (token ids in [0, VOCAB))


@dataclasses.dataclass(frozen=True)
class Layer:
    op: str
    srcs: tuple[int, ...]
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    inputs: tuple[InputSpec, ...]
    layers: tuple[Layer, ...]
    outputs: tuple[int, ...]
    batch: int = 1
    dynamic_batch: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        return cls(
            inputs=tuple(InputSpec(tuple(i["shape"]), i["dtype"]) for i in data["inputs"]),
            layers=tuple(
                Layer(layer["op"], tuple(layer["srcs"]), tuple((k, v) for k, v in layer["params"]))
                for layer in data["layers"]
            ),
            outputs=tuple(data["outputs"]),
            batch=data["batch"],
            dynamic_batch=data["dynamic_batch"],
        )

    def example_inputs(self, batch: int | None = None, seed: int = 0) -> tuple[Tensor, ...]:
        generator = torch.Generator().manual_seed(seed)
        n = batch or self.batch
        tensors = []
        for spec in self.inputs:
            if spec.dtype == "int64":
                tensors.append(torch.randint(0, VOCAB, (n, *spec.shape), generator=generator))
            else:
                tensors.append(torch.randn((n, *spec.shape), generator=generator))
        return tuple(tensors)


VOCAB = 50
ACTIVATIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
}


def _module_for(layer: Layer, in_shape: tuple[int, ...]) -> nn.Module | None:
    op, p = layer.op, layer.param
    if op == "conv2d":
        return nn.Conv2d(
            in_shape[0], p("out"), p("kernel"), p("stride"), p("padding"), groups=p("groups"), bias=p("bias")
        )
    if op == "conv_transpose2d":
        return nn.ConvTranspose2d(in_shape[0], p("out"), 2, stride=2, bias=p("bias"))
    if op == "conv1d":
        return nn.Conv1d(in_shape[0], p("out"), p("kernel"), padding=p("kernel") // 2, bias=p("bias"))
    if op == "linear":
        return nn.Linear(in_shape[-1], p("out"), bias=p("bias"))
    if op == "batchnorm":
        return {3: nn.BatchNorm2d, 2: nn.BatchNorm1d, 1: nn.BatchNorm1d}[len(in_shape)](in_shape[0])
    if op == "layernorm":
        return nn.LayerNorm(in_shape[-1])
    if op == "embedding":
        return nn.Embedding(VOCAB, p("dim"))
    if op == "dropout":
        return nn.Dropout(0.3)
    if op == "identity":
        return nn.Identity()
    return None


class FuzzModel(nn.Module):
    """Runs a ModelSpec. Parameterised layers are submodules ``layers.<index>``; BatchNorms get
    random running statistics so that folding them is a real change."""

    def __init__(self, spec: ModelSpec, shapes: list[tuple[int, ...]]):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        for index, layer in enumerate(spec.layers):
            module = _module_for(layer, shapes[layer.srcs[0]])
            if module is not None:
                self.layers[str(index)] = module
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)

    def forward(self, x0: Tensor, x1: Tensor | None = None) -> Any:
        values: list[Tensor] = [x0] if x1 is None else [x0, x1]
        for index, layer in enumerate(self.spec.layers):
            values.append(self._apply(index, layer, [values[i] for i in layer.srcs]))
        outputs = [values[i] for i in self.spec.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _apply(self, index: int, layer: Layer, args: list[Tensor]) -> Tensor:
        op, p, x = layer.op, layer.param, args[0]
        if str(index) in self.layers:
            return self.layers[str(index)](x)
        if op in ACTIVATIONS:
            return ACTIVATIONS[op](x)
        if op == "maxpool":
            return F.max_pool2d(x, 2)
        if op == "avgpool":
            return F.avg_pool2d(x, 2)
        if op == "global_pool":
            return x.mean((2, 3))
        if op == "add":
            return x + args[1]
        if op == "mul":
            return x * args[1]
        if op == "concat":
            return torch.cat(args, dim=1 if x.dim() == 4 else -1)
        if op == "flatten":
            return x.flatten(1)
        if op == "to_sequence":  # [N, F] -> [N, L, F / L]
            return x.reshape(x.size(0), p("length"), -1)
        if op == "from_sequence":  # [N, L, D] -> [N, L * D]
            return x.reshape(x.size(0), -1)
        if op == "attention_scores":  # [N, L, D] x [N, L, D] -> [N, L, L]
            return x @ args[1].transpose(1, 2)
        if op == "softmax":
            return torch.softmax(x, dim=-1)
        if op == "scale":  # x * 1 and x + 0 are cleanup's business; other constants are not
            return x * p("factor") + p("offset")
        if op == "contiguous":
            return x.transpose(-1, -2).contiguous().transpose(-1, -2)
        if op == "same_view":
            return x.view(x.shape)
        if op == "interpolate":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        raise ValueError(f"unknown op {op}")
