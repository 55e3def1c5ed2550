"""The documentation runs as written: every ```python block of README.md and docs/**/*.md is
executed, page by page in one namespace (a page's blocks build on each other), in a fresh
directory; and ``mkdocs build --strict`` succeeds, so a broken link, a missing page in the nav
or an API reference to a name that no longer exists fails the suite.

A block may include a file with a ``--8<-- "name"`` line (pymdownx.snippets, resolved against
``docs/snippets``). A page that needs an optional package says so in an HTML comment,
``<!-- test: requires trl, datasets -->``; the page is skipped only when that package is
missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = ROOT / "docs" / "snippets"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$', re.M)
REQUIRES = re.compile(r"<!-- test: requires ([\w, -]+) -->")


def python_blocks(text: str) -> list[str]:
    """The ```python blocks of a markdown text, in order, with snippet includes resolved."""
    return [
        INCLUDE.sub(lambda m: (SNIPPETS / m.group(1)).read_text(), block)
        for block in BLOCK.findall(text)
    ]


def test_block_reader_finds_blocks_and_resolves_includes():
    text = 'a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n--8<-- "tiny_model.py"\n```\n'
    blocks = python_blocks(text)
    assert len(blocks) == 2 and blocks[0] == "x = 1\n"
    assert "Qwen3ForCausalLM(" in blocks[1]  # the include was replaced by the file


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [p for p in PAGES if python_blocks(p.read_text())]


def test_pages_with_code_are_found():
    names = {_page_id(p) for p in RUNNABLE}
    assert {"README.md", "docs/sequence-ids.md", "docs/trl.md"} <= names


@pytest.fixture
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_page_code_runs(page, tmp_path, monkeypatch):
    text = page.read_text()
    for found in REQUIRES.findall(text):
        for module in filter(None, (m.strip() for m in found.split(","))):
            pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for i, block in enumerate(python_blocks(text)):
        exec(compile(block, f"<{_page_id(page)} block {i + 1}>", "exec"), namespace)


def test_mkdocs_build_strict(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "api" / "proma_accum" / "index.html").is_file()
    html = (tmp_path / "api" / "proma_accum" / "index.html").read_text()
    assert "projected_norm_ratio" in html  # the stats() docstring made it into the reference
    assert (tmp_path / "notebooks" / "proma_demo" / "index.html").is_file()
