"""``kiln export``: compile a model through passes to a backend artifact directory."""

from __future__ import annotations

import argparse
import json
import sys

import torchkiln
from torchkiln.backends import BACKEND_NAMES, get_backend
from torchkiln.cli.common import (
    MAX_SEED,
    add_model_arguments,
    calibration_batches,
    example_inputs,
    parse_dynamic,
    stage_printer,
    tolerance_from_flags,
)
from torchkiln.compiler import arguments
from torchkiln.compiler.files import check_destination
from torchkiln.compiler.kv_cache import MODES
from torchkiln.compiler.report import WIDTH
from torchkiln.compiler.verify import Tolerance
from torchkiln.driver.api import DEFAULT_PASSES
from torchkiln.driver.auto import AutoOptions
from torchkiln.driver.compiled import CompiledEncoderDecoder
from torchkiln.errors import ConfigError
from torchkiln.workflows import tasks
from torchkiln.workflows.loading import files_read, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="compile MODEL through passes to a backend artifact",
        description=__doc__,
        epilog=_backend_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--task",
        choices=tasks.TASKS,
        help="text-generation: a causal LM with its KV cache; text2text-generation: an encoder-decoder as "
        "encoder + decoder with its cache (both for `kiln generate`); automatic-speech-recognition: a speech "
        "encoder-decoder (Whisper) the same way, generating from input_features in Python (default for a model "
        "directory: from its config's architectures)",
    )
    parser.add_argument(
        "--passes",
        default=",".join(DEFAULT_PASSES),
        help=f"pass pipeline, comma-separated, options after a colon: quantize:mode=weight_only,bits=4 "
        f"(see kiln passes; '' for none; default: {','.join(DEFAULT_PASSES)})",
    )
    parser.add_argument("--backend", choices=(*BACKEND_NAMES, "auto"), default="onnxruntime",
                        help="runtime of the artifact; auto builds the candidates, verifies and times each, keeps "
                        "the fastest within the promise (default: onnxruntime)")  # fmt: skip
    parser.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend option, e.g. opset=19 (repeatable; see the backend's options in the docs; default: none)",
    )
    parser.add_argument(
        "--calibration",
        metavar="SOURCE",
        help="calibration data for quantize mode=int8: FILE.pt / FILE.npz (split into batches like the "
        "example input), or random:N for N random batches (a smoke test, not real ranges) (default: none)",
    )
    parser.add_argument("--dynamic-batch", action="store_true", help="make axis 0 of every input dynamic")
    parser.add_argument(
        "--kv-cache",
        choices=MODES,
        default="float",
        help="a causal LM's KV cache: float (default), int8 (per-head scales set per step) or int8-calibrated "
        "(per-head scales set on the --calibration prompts)",
    )
    parser.add_argument(
        "--dynamic",
        action="append",
        default=[],
        metavar="INPUT:AXIS=NAME",
        help="make one axis dynamic, e.g. input_ids:1=sequence (repeatable; default: all axes static)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        help=f"verification tolerance: absolute part (default {Tolerance().atol:g}; lossy passes: their promise)",
    )
    parser.add_argument(
        "--rtol",
        type=float,
        help=f"verification tolerance: part relative to output scale (default {Tolerance().rtol:g})",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="report the error against eager but do not fail on it"
    )
    parser.add_argument("-o", "--output", required=True, help="artifact directory (created, or replaced atomically if it is an artifact)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--verbose", action="store_true",
                        help="the report's lines in full (default: cut to 120 columns; --json has everything)")  # fmt: skip
    parser.set_defaults(run=run)


def _backend_options_help() -> str:
    """--backend-option keys per backend, from the options' own declarations."""
    lines = ["backend options (--backend-option KEY=VALUE):"]
    for name in (*BACKEND_NAMES, "auto"):
        rows = (AutoOptions if name == "auto" else get_backend(name).Options).describe()
        lines.append(f"  {name}:" + ("" if rows else " none"))
        lines += [f"    {key} ({type_}, default {default}): {doc}" for key, type_, default, doc in rows]
    return "\n".join(lines)


def _backend_options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"bad --backend-option '{item}'", where=item, hint="write key=value")
        options[key.strip()] = value.strip()
    return options


def run(args: argparse.Namespace) -> int:
    # before the work, not after it; never a directory holding the model or the calibration data
    check_destination(args.output, "artifact", files_read(args.model, calibration=args.calibration))
    arguments.integer("--seed", args.seed, low=0, high=MAX_SEED)
    model, entry = load_model(args.model, args.task)
    task = args.task or (
        tasks.inferred_task(args.model) if tasks.is_pretrained_directory(args.model) else None
    )
    if task is not None:
        inputs = tasks.task_inputs(
            model, task, example_inputs(args, entry) if args.input else None, args.seed
        )
    else:
        inputs = example_inputs(args, entry)
    progress = stage_printer(args.quiet)
    compiled = torchkiln.compile(
        model,
        inputs,
        passes=args.passes,
        backend=args.backend,
        backend_options=_backend_options(args.backend_option),
        dynamic_axes=parse_dynamic(args.dynamic, args.dynamic_batch, list(inputs)),
        calibration_data=calibration_batches(args, entry, inputs),
        verify=not args.no_verify,
        tolerance=tolerance_from_flags(args.atol, args.rtol),
        frontend=args.frontend,
        name=args.model if entry else None,
        progress=progress,
        kv_cache=args.kv_cache,
    )
    compiled.save(args.output)
    width = None if args.verbose else WIDTH
    if not args.quiet:
        if isinstance(compiled, CompiledEncoderDecoder):  # two artifacts, two reports
            parts = {"encoder": compiled.encoder.report, "decoder": compiled.decoder.report}
            if args.json:
                print(json.dumps({part: report.to_dict() for part, report in parts.items()}, indent=2, default=str))
            else:
                print("\n".join(f"{part}: {report.table(width)}" for part, report in parts.items()))
        else:
            print(compiled.report.to_json() if args.json else compiled.report.table(width))
        print(f"kiln: wrote {args.output}", file=sys.stderr)
    return 0
