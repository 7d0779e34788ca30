"""The docstrings' examples run, and the API reference builds from them."""

import doctest
import importlib
import importlib.util
import inspect
import pkgutil
from pathlib import Path

import pytest

import sngd_jax

MODULES = [info.name for info in pkgutil.walk_packages(
    sngd_jax.__path__, "sngd_jax.") if not info.name.endswith("__main__")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  result = doctest.testmod(importlib.import_module(name), optionflags=(
      doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE))
  assert result.failed == 0, name


def test_every_public_name_is_documented_with_an_example():
  examples = 0
  for name in sngd_jax.__all__:
    value = getattr(sngd_jax, name)
    if not (inspect.isfunction(value) or inspect.isclass(value)):
      continue
    doc = inspect.getdoc(value)
    assert doc and len(doc.splitlines()) > 1, name
    examples += ">>>" in doc
  # The transform, its alias, the captures, the state's reader, TrainState.
  assert examples >= 6, examples


def test_the_reference_builds_from_the_docstrings(tmp_path):
  # What `make docs` runs: pdoc over the package's public names, a warning
  # an error.
  spec = importlib.util.spec_from_file_location(
      "reference", Path(__file__).parents[1] / "docs" / "reference.py")
  reference = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reference)
  reference.build(tmp_path)
  page = (tmp_path / "sngd_jax.html").read_text()
  for name in sngd_jax.__all__:
    assert f'id="{name}"' in page, name
