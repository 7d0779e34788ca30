"""The docstrings' examples run, and the API reference builds from them."""

import doctest
import importlib
import inspect
import pkgutil

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


# Warnings are errors, but for the annotation of the ``opt_state`` field
# that sngd_jax.TrainState inherits from Flax's (Flax's ``ArrayTree``).
@pytest.mark.filterwarnings("ignore:Error parsing type annotation .*ArrayTree")
@pytest.mark.filterwarnings("error")
def test_the_reference_builds_from_the_docstrings(tmp_path):
  # `make docs` runs this: pdoc over the package's public names.
  import pdoc
  import pdoc.render

  pdoc.render.configure(docformat="google")
  pdoc.pdoc("sngd_jax", output_directory=tmp_path)
  page = (tmp_path / "sngd_jax.html").read_text()
  for name in sngd_jax.__all__:
    assert f'id="{name}"' in page, name
