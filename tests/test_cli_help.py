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
