"""Builds the API reference from the docstrings: ``make docs``.

Warnings are errors, but for the annotation of the ``opt_state`` field that
``sngd_jax.TrainState`` inherits from Flax's (Flax's ``ArrayTree``, which
pdoc cannot import).
"""

import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render


def build(output_directory: Path):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", "Error parsing type annotation .*ArrayTree")
    pdoc.render.configure(docformat="google")
    pdoc.pdoc("sngd_jax", output_directory=output_directory)


if __name__ == "__main__":
  build(Path(sys.argv[1] if len(sys.argv) > 1 else "build/reference"))
