"""The ``kiln`` command line: one module per command, all reached through :func:`main`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

from torchkiln.cli.common import plain
from torchkiln.compiler.report import PrintableStream
from torchkiln.errors import ConfigError, InputError, KilnError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    from torchkiln import __version__
    from torchkiln.cli import (
        bench,
        build,
        compare,
        export,
        generate,
        inspect,
        models,
        partition,
        passes,
        pipeline,
        tune,
    )

    parser = argparse.ArgumentParser(
        prog="kiln", description="torchkiln: compile PyTorch models to verified deployable artifacts"
    )
    parser.add_argument("--version", action="version", version=f"torchkiln {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in (build, tune, export, partition, pipeline, generate, bench, compare, inspect, passes, models):
        command.add_parser(sub)
    for command_parser in sub.choices.values():  # module docstrings are reST: --help shows plain text
        command_parser.description = plain(command_parser.description)
        for action in command_parser._actions:
            action.help = plain(action.help) if action.help != argparse.SUPPRESS else action.help
    return parser


@contextlib.contextmanager
def _printable_output() -> Iterator[None]:
    """While a command runs, what it prints has control characters escaped: a string read from a
    manifest, a recipe or a model's config reaches the terminal as text, never as an escape sequence."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = streams


def main(argv: Sequence[str] | None = None) -> int:
    with _printable_output():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KilnError as exc:
        if args.debug:
            raise
        line = f"kiln {args.command}: error: {exc.message}"
        if exc.where:
            line += f" [at {exc.where}]"
        if exc.hint:
            line += f" (hint: {exc.hint})"
        print(line.replace("\n", " "), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, InputError)) else EXIT_FAILED
    except BrokenPipeError:  # the reader went away (`kiln passes | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return EXIT_OK
    except KeyboardInterrupt:
        print(f"kiln {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"kiln {args.command}: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)".replace(
                "\n", " "
            ),
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def console_main() -> None:
    sys.exit(main())
