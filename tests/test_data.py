"""The benchmark's loaders on small generated files of the real formats."""

import gzip
import pickle

import numpy as np
import pytest

from sngd_jax.bench import data


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(n).to_bytes(4, "big") for n in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_images_reads_any_mnist_format_directory(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 28, 28))
  labels = rng.integers(0, 10, 12)
  for split, count in (("train", 12), ("t10k", 6)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:count])
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[:count])
  d = data.idx_images(tmp_path, val_fraction=1 / 4)
  assert d.x_train.shape == (9, 28, 28) and d.x_val.shape == (3, 28, 28)
  assert d.x_test.shape == (6, 28, 28) and d.x_train.dtype == np.float32
  np.testing.assert_allclose(d.x_test, images[:6] / 255.0, rtol=1e-6)
  # The split keeps every image with its own label.
  both = np.concatenate([d.x_train, d.x_val])
  labels_of = {tuple(np.round(x * 255).astype(int).ravel()[:8]): y
               for x, y in zip(both, np.concatenate([d.y_train, d.y_val]))}
  for image, label in zip(images, labels):
    assert labels_of[tuple(image.ravel()[:8])] == label


def _write_cifar_batch(path, data_rows, labels):
  with open(path, "wb") as f:
    pickle.dump({b"data": data_rows, b"labels": list(labels),
                 b"batch_label": b"generated"}, f)


def test_cifar10_reads_the_python_batches_channel_planes_last(tmp_path):
  rng = np.random.default_rng(0)
  rows = {name: rng.integers(0, 256, (4, 3072), dtype=np.uint8)
          for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
  for name, batch in rows.items():
    _write_cifar_batch(tmp_path / name, batch, rng.integers(0, 10, 4))
  d = data.cifar10(tmp_path, val_fraction=0.25)
  assert d.x_train.shape == (15, 32, 32, 3) and d.x_val.shape == (5, 32, 32, 3)
  assert d.x_test.shape == (4, 32, 32, 3) and d.y_test.dtype == np.int32
  # Pixel (row 2, column 5) of channel c is byte c * 1024 + 2 * 32 + 5.
  first = rows["test_batch"][0]
  for channel in range(3):
    assert d.x_test[0, 2, 5, channel] == pytest.approx(
        first[channel * 1024 + 2 * 32 + 5] / 255.0)


def test_cifar10_names_the_missing_batch(tmp_path):
  with pytest.raises(FileNotFoundError, match="data_batch_1.*CIFAR-10"):
    data.cifar10(tmp_path)
