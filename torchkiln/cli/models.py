"""``kiln models``: the zoo's models with their inputs."""

from __future__ import annotations

import argparse

from torchkiln import models


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("models", help="list the zoo models", description=__doc__)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name, entry in models.ZOO.items():
        inputs = ", ".join(
            f"{i.name}={'x'.join(map(str, i.shape))}:{str(i.dtype).removeprefix('torch.')}"
            for i in entry.inputs
        )
        print(f"{name:18s} {inputs:28s} {entry.description}")
    return 0
