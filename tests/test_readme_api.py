"""README.md introduces: at most 250 lines, no hand-typed measurements, and its Python API example
runs as written.

The example is the first ```python block under "## Python API", executed unchanged. The fast test
swaps `load_model` for a tiny random Llama with the default model's tokenizer (the answer is noise,
but every call, the budget and the memory report are real); the slow one runs it on the default
model and checks what its comments promise: the pass key, a ratio within the budget, no note.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
SHAPE = dict(hidden_size=128, intermediate_size=256, head_dim=64, num_attention_heads=2, num_key_value_heads=1)


def api_block() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    assert found, "README.md's Python API section has no ```python block"
    return found.group(1)


def run_api(capsys) -> tuple[dict, list[str]]:
    namespace: dict = {"__name__": "readme_api"}
    exec(compile(api_block(), "README.md (Python API)", "exec"), namespace)
    return namespace, capsys.readouterr().out.splitlines()


def test_readme_is_at_most_250_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines: move reference material to docs/"


def test_readme_holds_no_measured_figures():
    """Measurements live in generated files (REPORT.md, metrics/), where they cannot drift from the data."""
    text = README.read_text(encoding="utf-8")
    for pattern in (r"\d+(\.\d+)?\s*(minutes|min\b|GFLOP/s)", r"\b\d+ min \d+ s\b", r"\bp\s*[<=≤]\s*0?\.\d",
                    r"revision [0-9a-f]{7}", r"\b\d+ passed\b"):
        hit = re.search(pattern, text)
        assert not hit, f"README.md holds a measured figure ({hit.group(0)!r}): point to REPORT.md or metrics/ instead"


def test_api_example_runs_on_a_tiny_model(monkeypatch, capsys):
    import smartkv.models
    from smartkv.cache.base import KVCache

    torch.set_num_threads(1)
    tok = smartkv.models.load_tokenizer("default")
    asked = []

    def tiny(name, *args, **kwargs):
        asked.append(name)
        # head_dim 64 as SmolLM2's: one scale per head vector, so the budget's floor is the real one
        return smartkv.models.tiny_model("llama", seed=0, vocab_size=len(tok), **SHAPE), tok

    monkeypatch.setattr(smartkv.models, "load_model", tiny)
    ns, printed = run_api(capsys)
    assert asked == ["default"]
    assert isinstance(ns["cache"], KVCache) and ns["out"].shape[1] > ns["ids"]["input_ids"].shape[1]
    assert ns["ids"]["input_ids"].shape[1] > 900  # "~1k tokens": long enough for the budget to bite
    report = ns["report"]
    assert report["budget_met"] and report["budget_note"] == "" and 0 < report["ratio"] <= 0.3
    assert len(printed) == 2 and printed[1].split()[1] == "True"


@pytest.mark.slow
def test_api_example_on_the_default_model(capsys):
    torch.set_num_threads(2)
    ns, printed = run_api(capsys)
    assert "52173" in printed[0], printed  # "# the pass key"
    report = ns["report"]
    assert report["budget_met"] and report["budget_note"] == "" and report["ratio"] <= 0.3  # "at most 0.3, True, """
