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


def digits(seed: int = 0, val_fraction: float = 0.1) -> Dataset:
  """scikit-learn's bundled 8x8 digits (inputs ``(N, 64)`` in [0, 1])."""
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order] / 16.0, y[order]
  n_test = len(x) // 5
  return _split(x[n_test:], y[n_test:], x[:n_test], y[:n_test], "digits",
                val_fraction, seed)
