"""Every code block of README.md and docs/*.md runs, so an example cannot drift from the code.

A page is run top to bottom in a fresh directory holding a copy of ``examples/``, as a reader would
type it: each ``python`` block in a namespace of its own (so a block that leans on another's imports
or names fails; run in the test's process, which has torch imported already), each ``bash`` block with ``bash -euo pipefail`` and ``kiln`` on the PATH, each ``toml``
block that is a recipe through the recipe checker (``load_recipe``). Blocks marked ``text`` are
output or syntax and are not run. An HTML comment right above a block steers it:

* ``<!-- doc-test: skip REASON -->`` — not run; the reason is required and the test lists it;
* ``<!-- doc-test: replace A=>B; C=>D -->`` — the documented placeholders ``A``, ``C`` filled in.

Files a block writes stay for the page's later blocks (a model saved in one, exported in the next).
Each block has a time limit; the whole of it is CI's (``make test``). ``make docs`` builds the site
with ``--strict`` (a broken link or reference is an error): ``test_the_site_builds``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash", "toml"}
#: languages that are shown, never run: outputs, file trees, synopses, formats
SHOWN = {"text", "json", "ini", "mermaid"}
BLOCK_SECONDS = 300
FENCE = re.compile(r"^```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!-- doc-test: (skip|replace) (.*?) -->$")


@dataclass
class Block:
    page: str
    line: int
    language: str
    code: str
    skip: str | None = None
    replace: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def blocks(path: Path, root: Path = ROOT) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    directive: tuple[str, str] | None = None
    index = 0
    while index < len(lines):
        match = DIRECTIVE.match(lines[index].strip())
        if match:
            directive = (match.group(1), match.group(2).strip())
            index += 1
            continue
        fence = FENCE.match(lines[index])
        if fence:
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            block = Block(str(path.relative_to(root)), index + 1, fence.group(1), "\n".join(lines[index + 1 : end]))
            if directive and directive[0] == "skip":
                block.skip = directive[1]
            elif directive:
                pairs = [p.split("=>", 1) for p in directive[1].split(";") if "=>" in p]
                block.replace = tuple((a.strip(), b.strip()) for a, b in pairs)
            found.append(block)
            directive, index = None, end + 1
            continue
        if lines[index].strip():
            directive = None  # a directive binds the block right below it only
        index += 1
    return found


def test_every_block_says_what_it_is():
    """A block without a language would silently never run: each is run, or shown as text."""
    unlabelled = [b.where for page in PAGES for b in blocks(page) if b.language not in RUN | SHOWN]
    assert unlabelled == []
    unexplained = [b.where for page in PAGES for b in blocks(page) if b.skip is not None and len(b.skip) < 10]
    assert unexplained == []


def test_the_extractor_reads_directives_and_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- doc-test: skip needs a GPU -->\n```bash\nkiln x\n```\n\n"
                    "<!-- doc-test: replace MODEL=>mlp; DIR=>out -->\n```bash\nkiln export MODEL -o DIR\n```\n"
                    "<!-- doc-test: skip stale -->\ntext between\n```python\nprint(1)\n```\n")  # fmt: skip
    found = blocks(page, root=tmp_path)
    assert [(b.language, b.skip, b.replace) for b in found] == [
        ("bash", "needs a GPU", ()), ("bash", None, (("MODEL", "mlp"), ("DIR", "out"))), ("python", None, ())
    ]


def _run(block: Block, cwd: Path) -> None:
    code = block.code
    for placeholder, value in block.replace:
        code = code.replace(placeholder, value)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TORCHKILN_CACHE_DIR": str(cwd / ".cache")}  # fmt: skip
    if block.language == "toml":
        data = tomllib.loads(code)
        if "model" in data:
            from torchkiln.workflows.recipe import load_recipe

            (cwd / "doc-recipe.toml").write_text(code)
            load_recipe(cwd / "doc-recipe.toml")
        return
    if block.language == "python":
        try:
            exec(compile(code, block.where, "exec"), {"__name__": "__main__"})  # noqa: S102 - our own docs
        except Exception as exc:
            raise AssertionError(f"{block.where}: the python block failed: {type(exc).__name__}: {exc}\n{code}") from exc
        return
    command = ["bash", "-euo", "pipefail", "-c", code]
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the {block.language} block ran over {BLOCK_SECONDS} s")
    assert done.returncode == 0, f"{block.where}: the {block.language} block failed:\n{code}\n---\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


#: the pages with something to run (a page of prose and tables only has no case here, not a skipped one)
RUNNABLE = [page for page in PAGES if any(b.language in RUN for b in blocks(page))]


@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_every_block_of_the_page_runs(page, tmp_path, monkeypatch):
    runnable = [b for b in blocks(page) if b.language in RUN]
    shutil.copytree(ROOT / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("build", "tune*", "__pycache__"))
    monkeypatch.chdir(tmp_path)  # the python blocks write where the bash blocks read
    monkeypatch.setenv("TORCHKILN_CACHE_DIR", str(tmp_path / ".cache"))
    skipped = []
    for block in runnable:
        if block.skip is not None:
            skipped.append(f"{block.where}: {block.skip}")
            continue
        started = time.perf_counter()
        _run(block, tmp_path)
        print(f"{block.where}: {block.language} block ran in {time.perf_counter() - started:.1f} s")
    assert len(skipped) < len(runnable) or not runnable, f"every block of {page.name} is skipped: {skipped}"


def test_the_site_builds(tmp_path):
    """``make docs``: mkdocs with --strict (a broken link, anchor or API reference fails)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists() and (tmp_path / "site" / "api" / "index.html").exists()
