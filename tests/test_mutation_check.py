"""scripts/mutation_check.py stays in step with the code it mutates (the check itself takes minutes)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


MUTATIONS = _script().MUTATIONS


@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_finds_its_code_once(m):
    text = (ROOT / m.file).read_text()
    assert text.count(m.old) == 1, f"{m.name}: update its old text to {m.file}"
    assert m.new != m.old and m.tests and all((ROOT / t).is_file() for t in m.tests)


def test_premise_mutations_are_checked_by_the_premise_tests():
    by_name = {m.name: m for m in MUTATIONS}
    for name in ("reversed-ranking", "zeroed-tracker"):
        assert "tests/test_premise.py" in by_name[name].tests
