"""Every ``kiln`` command's ``--help``: each option says what it does and, when it takes a value
with a default, what that default is; descriptions are plain text (no reST markup)."""

from __future__ import annotations

import argparse

import pytest

from torchkiln.cli import build_parser


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_says_what_it_does_and_its_default(command):
    parser = _commands()[command]
    missing = []
    required_choice = {a for group in parser._mutually_exclusive_groups if group.required for a in group._group_actions}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        text = action.help or ""
        name = "/".join(action.option_strings) or action.dest
        if not text.strip():
            missing.append(f"{name}: no help")
        elif action.option_strings and action.nargs != 0 and "default" not in text and not action.required:
            if action in required_choice and "required" in text:
                continue
            missing.append(f"{name}: no default in {text!r}")
    assert missing == []


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_is_plain_text(command):
    text = _commands()[command].format_help()
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:"):
        assert markup not in text, (command, markup)


def test_the_report_fits_120_columns_and_verbose_prints_it_whole(tmp_path, capsys):
    """The transformer's cleanup changes a dozen op kinds: the cell was ~250 characters wide."""
    from torchkiln.cli import main

    argv = ["export", "text_encoder", "--passes", "cleanup,quantize:mode=dynamic", "--quiet"]
    assert main([*argv[:-1], "-o", str(tmp_path / "a")]) == 0
    short = capsys.readouterr().out.splitlines()
    assert max(map(len, short)) <= 120, max(short, key=len)
    assert "torchkiln.dynamic_linear +13" in "\n".join(short) and any("quick latency sample" in line for line in short)
    assert main([*argv[:-1], "-o", str(tmp_path / "b"), "--verbose"]) == 0
    whole = capsys.readouterr().out.splitlines()
    assert max(map(len, whole)) > 120 and "torchkiln.dynamic_linear +13" in "\n".join(whole)


def test_a_cell_too_long_for_its_line_is_cut_with_a_count():
    from torchkiln.compiler.report import _cut

    cell = "add -3, aten.add -1, aten.arange -2, aten.expand -4; noops_removed=3, reshapes_removed=2"
    assert _cut(cell, 50) == "add -3, aten.add -1, ... 4 more (--verbose)" and _cut(cell, None) == cell


def test_kiln_passes_prints_plain_text_and_a_closed_pipe_is_no_error(capsys):
    import subprocess
    import sys

    from torchkiln.cli import main

    assert main(["passes", "quantize"]) == 0
    out = capsys.readouterr().out
    assert "mode (int8|dynamic|weight_only|fp16|bf16" in out and "``" not in out and ":mod:" not in out
    done = subprocess.run(f"{sys.executable} -m torchkiln.cli passes | head -1", shell=True, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.stdout.startswith("cleanup:") and "error" not in done.stderr, done.stderr
