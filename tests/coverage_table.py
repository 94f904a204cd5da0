"""The coverage tables of docs/coverage.md, written by a test: each run compares the cells it measured with README's and fails
on a stale one; with ``TORCHKILN_WRITE_COVERAGE=1`` and every case measured it rewrites the table.
Used by the model coverage and generation coverage tests."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "docs" / "coverage.md"


class Table:
    def __init__(self, section: str, rows: Sequence[tuple[str, str]], cases: Sequence[str], target: str):
        """``section`` names README's ``<!-- section:begin -->`` markers; ``rows`` are (name, family);
        ``target`` is the make target that rewrites the table."""
        self.begin, self.end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
        self.rows, self.cases, self.target = list(rows), tuple(cases), target
        self.results: dict[str, dict[str, str]] = {}

    def record(self, row: str, case: str, cell: str) -> None:
        self.results.setdefault(row, {})[case] = cell

    def render(self, results: dict[str, dict[str, str]]) -> str:
        head = "| architecture | family | " + " | ".join(self.cases) + " |"
        lines = [head, "|" + "---|" * (len(self.cases) + 2)]
        for name, family in self.rows:
            cells = [results.get(name, {}).get(case, "") for case in self.cases]
            lines.append(f"| {name} | {family} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def parse(self, text: str) -> dict[str, dict[str, str]]:
        """README's table back into {row: {case: cell}}."""
        match = re.search(re.escape(self.begin) + r"(.*?)" + re.escape(self.end), text, re.S)
        assert match, f"docs/coverage.md has no {self.begin} ... {self.end} section (run `make {self.target}` to write it)"
        lines = [line for line in match.group(1).splitlines() if line.startswith("|")]
        assert lines, f"README's {self.begin} table is empty (run `make {self.target}` to write it)"
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        assert header == ["architecture", "family", *self.cases], f"README's table has columns {header}"
        table = {}
        for line in lines[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            table[cells[0]] = dict(zip(self.cases, cells[2:]))
        return table

    def finish(self) -> None:
        """After the module: README must say what this run measured, or (when asked) be rewritten."""
        if os.environ.get("TORCHKILN_WRITE_COVERAGE") == "1":
            missing = [f"{n}/{c}" for n, _ in self.rows for c in self.cases if c not in self.results.get(n, {})]
            assert not missing, f"not writing README: {len(missing)} cases did not pass or run, e.g. {missing[:5]}"
            text = README.read_text()
            start, end = text.index(self.begin) + len(self.begin), text.index(self.end)
            README.write_text(text[:start] + "\n" + self.render(self.results) + "\n" + text[end:])
            return
        readme = self.parse(README.read_text())
        assert sorted(readme) == sorted(n for n, _ in self.rows), f"README's table rows: run `make {self.target}`"
        stale = [
            f"{name}/{case}: README says {readme[name][case]!r}, this run {cell!r}"
            for name, cells in self.results.items()
            for case, cell in cells.items()
            if readme[name][case] != cell
        ]
        assert not stale, f"README's table is stale (run `make {self.target}`): " + "; ".join(stale)
