"""``kiln passes``: the registered passes with their options, types, defaults and descriptions."""

from __future__ import annotations

import argparse
import json

from torchkiln.cli.common import plain
from torchkiln.compiler.passes import get_pass, registered_passes


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("passes", help="list passes and their options", description=__doc__)
    parser.add_argument("name", nargs="?", help="show one pass in full")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    passes = {args.name: get_pass(args.name)} if args.name else registered_passes()
    if args.json:
        data = {
            name: {
                "doc": (cls.__doc__ or "").strip(),
                "options": [
                    dict(zip(("name", "type", "default", "doc"), row)) for row in cls.Config.describe()
                ],
            }
            for name, cls in passes.items()
        }
        print(json.dumps(data, indent=2))
        return 0
    for name, cls in passes.items():  # docstrings are reST; the terminal gets plain text
        print(plain(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0]}"))
        if args.name:
            module_doc = (__import__(cls.__module__, fromlist=["_"]).__doc__ or "").strip()
            print("\n" + str(plain(module_doc)) + "\n")
        for option, type_name, default, doc in cls.Config.describe():
            print(plain(f"    {option} ({type_name}, default {default}): {doc}"))
    return 0
