"""README.md stays well formed and points at things that exist: its tables have a separator row
and a constant number of columns, every ``python -m benchmarks.X`` it names is a module of the
repository, and every image it shows is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


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


def test_readme_tables_are_well_formed():
    blocks = tables(README.read_text())
    assert blocks, "the README has tables (benchmarks, demo results, dependencies)"
    problems = [p for block in blocks for p in table_problems(block)]
    assert problems == []


def test_readme_benchmark_commands_and_images_exist():
    text = README.read_text()
    modules = set(re.findall(r"python -m benchmarks\.(\w+)", text))
    assert {"run", "floor", "attribute"} <= modules
    for name in modules:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), name
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images
    for path in images:
        assert (ROOT / path).is_file(), path
