"""README.md and docs/ stay well formed and point at things that exist: their tables have a
separator row and a constant number of columns, every ``python -m benchmarks.X`` they name is a
module of the repository, every image and relative link of the README is in the repository, the
README's test command is the one CI runs, and the evidence page's table is the one its results
file gives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
# Pages written on other branches at the same time; remove each name once its page is merged.
PENDING_PAGES: set[str] = set()  # pages linked before they exist (none now)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text: str) -> list[list[str]]:
    """Blocks of consecutive lines that start with ``|``, outside code fences."""
    blocks: list[list[str]] = []
    current: list[str] = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("|"):
            current.append(line)
            continue
        if current:
            blocks.append(current)
            current = []
    if current:
        blocks.append(current)
    return blocks


def table_problems(block: list[str]) -> list[str]:
    """What is wrong with one markdown table (an empty list when nothing is)."""
    if len(block) < 2:
        return [f"a table needs a header and a separator row: {block[0][:60]!r}"]
    width = len(_cells(block[0]))
    separator = _cells(block[1])
    problems = []
    if not all(re.fullmatch(r":?-+:?", c) for c in separator):
        problems.append(f"second row is not a separator: {block[1][:60]!r}")
    problems += [
        f"{len(_cells(line))} columns instead of {width}: {line[:60]!r}"
        for line in block
        if len(_cells(line)) != width
    ]
    return problems


def test_table_checker_catches_a_missing_separator_and_a_short_row():
    good = ["| a | b |", "|---|---:|", "| 1 | 2 |"]
    assert table_problems(good) == []
    assert table_problems([good[0], good[2]])  # separator dropped
    assert table_problems([*good, "| 3 |"])  # a row with a missing cell


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_are_well_formed(page):
    problems = [p for block in tables(page.read_text()) for p in table_problems(block)]
    assert problems == []


def test_readme_and_docs_have_tables():
    assert tables(README.read_text()), "the README has tables (layouts, settings, API)"
    assert tables((ROOT / "docs" / "evidence.md").read_text())


def test_benchmark_commands_and_readme_images_exist():
    text = "\n".join(p.read_text() for p in [README, *DOCS])
    modules = set(re.findall(r"python -m benchmarks\.(\w+)", text))
    assert {"run", "floor", "attribute"} <= modules
    for name in modules:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), name
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README.read_text())
    assert images
    for path in images:
        assert (ROOT / path).is_file(), path


def relative_links(text: str) -> list[str]:
    """Targets of markdown links that are paths in the repository (no URL, no anchor-only)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]


def test_link_reader_sees_paths_only():
    text = "[a](docs/x.md#s) [b](https://example.org) [c](#top) ![d](docs/f.png)"
    assert relative_links(text) == ["docs/x.md", "docs/f.png"]


def test_readme_links_point_at_files():
    missing = [
        t for t in relative_links(README.read_text())
        if not (ROOT / t).exists() and t not in PENDING_PAGES
    ]  # fmt: skip
    assert missing == []


def test_readme_test_command_is_the_one_ci_runs():
    command = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q --nbmake'
    assert f"```bash\n{command}\n```" in README.read_text()
    assert command in (ROOT / ".ci" / "run").read_text()
    demo = 'pip install torch==2.13.0 && pip install -e ".[demo]" && proma-accum demo'
    assert f"```bash\n{demo}\n```" in README.read_text()


def test_evidence_table_is_the_one_of_its_results_file():
    from proma_accum.demo._report import format_table, summarize

    results = json.loads((ROOT / "docs" / "demo-cpu-results.json").read_text())
    assert format_table(results, summarize(results)) in (ROOT / "docs" / "evidence.md").read_text()
