"""Offline datasets: MNIST-1D (generated), MNIST-format IDX files, sklearn digits.

Nothing is downloaded. Every loader returns a :class:`Dataset` of float32
inputs and int32 labels with a held-out validation split carved from the
training set (hyperparameters are chosen on it, never on the test set).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class Dataset(NamedTuple):
  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def _split(x, y, x_test, y_test, name, val_fraction, seed):
  order = np.random.default_rng(seed).permutation(len(x))
  n_val = int(len(x) * val_fraction)
  val, train = order[:n_val], order[n_val:]
  return Dataset(x[train].astype(np.float32), y[train].astype(np.int32),
                 x[val].astype(np.float32), y[val].astype(np.int32),
                 x_test.astype(np.float32), y_test.astype(np.int32), name)


def mnist1d(num_samples: int = 5000, seed: int = 42,
            val_fraction: float = 0.1) -> Dataset:
  """MNIST-1D generated offline by the ``mnist1d`` package (inputs ``(N, 40)``).

  The package's default arguments are those of the MNIST-1D paper (5000
  samples, 80/20 train/test split).
  """
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples, args.seed = num_samples, seed
  data = make_dataset(args)
  return _split(data["x"], data["y"], data["x_test"], data["y_test"],
                "mnist1d", val_fraction, seed)


def _read_idx(path: Path) -> np.ndarray:
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    raw = f.read()
  dims = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                for i in range(dims))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(directory: Path, stem: str) -> Path:
  for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"),
               stem.replace("-idx", ".idx") + ".gz"):
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(f"no {stem}[.gz] in {directory}")


def idx_images(directory: str | os.PathLike = FASHION_MNIST_DIR,
               val_fraction: float = 1 / 6, seed: int = 0,
               name: str | None = None) -> Dataset:
  """Any MNIST-format IDX directory (Fashion-MNIST, MNIST): images ``(N, 28, 28)`` in [0, 1].

  With the default ``val_fraction`` the 60k training images split 50k/10k,
  the SNGD paper's protocol.
  """
  directory = Path(directory)
  x = _read_idx(_find(directory, "train-images-idx3-ubyte")) / 255.0
  y = _read_idx(_find(directory, "train-labels-idx1-ubyte"))
  x_test = _read_idx(_find(directory, "t10k-images-idx3-ubyte")) / 255.0
  y_test = _read_idx(_find(directory, "t10k-labels-idx1-ubyte"))
  return _split(x, y, x_test, y_test, name or directory.name, val_fraction, seed)


def fashion_mnist_available(directory: str = FASHION_MNIST_DIR) -> bool:
  try:
    _find(Path(directory), "train-images-idx3-ubyte")
    return True
  except FileNotFoundError:
    return False


def cifar10(directory: str | os.PathLike, val_fraction: float = 0.1,
            seed: int = 0) -> Dataset:
  """CIFAR-10 from its python-pickle batches: images ``(N, 32, 32, 3)`` in [0, 1].

  ``directory`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``
  (``cifar-10-batches-py`` as the dataset's site distributes it; nothing is
  downloaded here). Each batch is a pickled dict whose ``data`` rows are
  3072 bytes, the red, green and blue 32x32 planes one after the other.
  """
  import pickle

  directory = Path(directory)

  def read(name):
    path = directory / name
    if not path.exists():
      raise FileNotFoundError(
          f"no {name} in {directory}: expected CIFAR-10's python batches "
          "(data_batch_1 ... data_batch_5, test_batch)")
    with open(path, "rb") as f:
      batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32)
    return data.transpose(0, 2, 3, 1) / 255.0, np.asarray(batch[b"labels"])

  train = [read(f"data_batch_{i}") for i in range(1, 6)]
  x_test, y_test = read("test_batch")
  return _split(np.concatenate([x for x, _ in train]),
                np.concatenate([y for _, y in train]), x_test, y_test,
                "cifar10", val_fraction, seed)


def digits(seed: int = 0, val_fraction: float = 0.1) -> Dataset:
  """scikit-learn's bundled 8x8 digits (inputs ``(N, 64)`` in [0, 1])."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order] / 16.0, y[order]
  n_test = len(x) // 5
  return _split(x[n_test:], y[n_test:], x[:n_test], y[:n_test], "digits",
                val_fraction, seed)


# Printable ASCII and the newline; any other character reads as "?".
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))


def python_docs(context: int = 64, val_fraction: float = 0.05,
                test_fraction: float = 0.05) -> Dataset:
  """A character-level language-modelling corpus that ships with Python.

  The text of ``pydoc_data.topics`` (the reference manual's topics behind
  ``help()``: 465k characters on Python 3.11), topics in sorted order, read as
  :data:`CHARACTERS` (96 symbols). Windows of ``context`` characters (inputs)
  and the same shifted by one (targets); the corpus splits by position into
  train, validation and test (the last ``test_fraction``), so held-out text
  is never trained on. The corpus depends on the Python version: the
  dataset's name carries it.
  """
  from pydoc_data.topics import topics

  text = "".join(topics[key] for key in sorted(topics))
  return _characters(text, context, val_fraction, test_fraction, "docs")


def python_sources(context: int = 256, characters: int = 8_000_000,
                   val_fraction: float = 0.02,
                   test_fraction: float = 0.02) -> Dataset:
  """Python's own standard library sources as a character-level corpus.

  The first ``characters`` characters of the ``.py`` files under
  ``sysconfig``'s ``stdlib`` directory, in sorted path order (test suites
  and ``site-packages`` left out), split and windowed as
  :func:`python_docs`'s.
  """
  import sysconfig

  root = Path(sysconfig.get_paths()["stdlib"])
  parts, total = [], 0
  for path in sorted(root.rglob("*.py")):
    relative = path.relative_to(root).parts
    if {"test", "tests", "site-packages", "idle_test"} & set(relative):
      continue
    parts.append(path.read_text(encoding="utf-8", errors="replace"))
    total += len(parts[-1])
    if total >= characters:
      break
  return _characters("".join(parts)[:characters], context, val_fraction,
                     test_fraction, "sources")


def _characters(text: str, context: int, val_fraction: float,
                test_fraction: float, kind: str) -> Dataset:
  """Windows of ``text`` as :data:`CHARACTERS` codes, split by position."""
  import sys

  table = np.full(128, CHARACTERS.index("?"), np.int32)
  table[[ord(c) for c in CHARACTERS]] = np.arange(len(CHARACTERS))
  codes = table[np.minimum(np.frombuffer(text.encode("utf-32-le"),
                                         np.uint32), 127)]

  def windows(part):
    count = (len(part) - 1) // context
    x = part[:count * context].reshape(count, context)
    y = part[1:count * context + 1].reshape(count, context)
    return x.astype(np.int32), y.astype(np.int32)

  n = len(codes)
  val_start = int(n * (1 - val_fraction - test_fraction))
  test_start = int(n * (1 - test_fraction))
  x_train, y_train = windows(codes[:val_start])
  order = np.random.default_rng(0).permutation(len(x_train))
  x_val, y_val = windows(codes[val_start:test_start])
  x_test, y_test = windows(codes[test_start:])
  return Dataset(x_train[order], y_train[order], x_val, y_val, x_test, y_test,
                 f"python{sys.version_info.major}.{sys.version_info.minor}-{kind}")
