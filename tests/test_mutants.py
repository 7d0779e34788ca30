"""The mutation check cannot rot: each mutation applies, and stays Python."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mutants  # noqa: E402


@pytest.mark.parametrize("mutation", mutants.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_text_occurs_once_and_compiles(mutation):
  source = (mutants.ROOT / mutation.path).read_text()
  assert source.count(mutation.old) == 1, (
      f"{mutation.name}: its text occurs {source.count(mutation.old)} times "
      f"in {mutation.path}; update tests/mutants.py with the code")
  compile(source.replace(mutation.old, mutation.new), mutation.path, "exec")
