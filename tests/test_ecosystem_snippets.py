"""The README's integration snippets ("Use with TRL", "Use with a Hugging Face Trainer",
"Use with VeRL"), read from README.md and run exactly as written (each in a fresh namespace and
directory, after the shared tiny-model block)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest and does not thrash on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _first_block_after(heading: str) -> str:
    """The first ```python block after the line ``heading`` in README.md."""
    text = README.read_text()
    start = text.index(heading + "\n")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    assert match is not None, heading
    return match.group(1)


TINY = _first_block_after("## Integrations")
SNIPPETS = {
    "trl": _first_block_after("### Use with TRL"),
    "hf_trainer": _first_block_after("### Use with a Hugging Face Trainer"),
    "verl": _first_block_after("### Use with VeRL"),
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_runs(name, tmp_path, monkeypatch):
    if name == "trl":
        pytest.importorskip("trl")
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"snippet_{name}"}
    exec(compile(TINY, "<tiny>", "exec"), namespace)
    exec(compile(SNIPPETS[name], f"<snippet {name}>", "exec"), namespace)
    acc = namespace["acc"] if name == "verl" else namespace["trainer"].proma
    assert acc.stats()["step"]["all"]["projected_norm_ratio"] > 0


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(_first_block_after("## Example"), "<readme example>", "exec"), namespace)
    assert namespace["acc"].stats()["step"]["all"]["projected_norm_ratio"] > 0
