"""The documentation runs: every ```python block of the pages in RUNNABLE executes (blocks of one
page share a namespace, in order); other pages may hold sketches (protocols, objects the reader
supplies). Every figure in docs/ exists and has the command that makes it on its page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: pages whose ```python blocks are complete programs
RUNNABLE = ("getting-started.md", "extending.md", "likelihood.md", "convergence.md")
PAGES = [DOCS / name for name in RUNNABLE]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)  # blocks may write figures
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), namespace)


def test_every_docs_figure_names_the_command_that_makes_it():
    """Each image a page shows exists and the page names a command that writes it (a script in
    examples/ or benchmarks/, or a difsolve command, with ``--out docs/img`` or the file name)."""
    for page in DOCS.rglob("*.md"):
        text = page.read_text()
        for image in re.findall(r"!\[[^\]]*\]\((img/[^)]+)\)", text):
            assert (DOCS / image).exists(), f"{page.name}: {image} is missing"
            name = Path(image).name
            # inline (`python examples/x.py --out docs/img`) or in a fenced block
            commands = re.findall(r"((?:python (?:examples|benchmarks)/\S+|difsolve \w+)[^`\n]*)",
                                  text)
            assert any("--out docs/img" in c or name in c for c in commands), \
                f"{page.name}: no command beside {image}"
