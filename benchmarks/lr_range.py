"""Which learning rates reach the target, and which diverge, for each optimizer.

SNGD with its defaults (and momentum 0.9, as in the benchmark), Adam, SGD with
momentum 0.9 and Muon, each over the same grid of learning rates spanning four
decades, on the same batches (``sngd_jax.bench``'s training loop, one
process). Tasks: the SNGD paper's MLP 784-80-80-80-10 on Fashion-MNIST at its
batch size 50 (when the Debian package is installed), and the MNIST-1D CNN.
Prints, per task and optimizer, the epochs to the target at each learning
rate with the final train loss ("-" not reached, "NaN" non-finite) and the
range in decades that reached it.

    python benchmarks/lr_range.py [--epochs-scale 1.0]
"""

import argparse
import math

import numpy as np

from sngd_jax.bench import data as datasets
from sngd_jax.bench import harness as bench
from sngd_jax.bench import models

GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)


def tasks(scale):
  out = [bench.Task("mnist1d-cnn", datasets.mnist1d, models.CNN, 100,
                    max(1, int(15 * scale)), 0.3)]
  if datasets.fashion_mnist_available():
    out.insert(0, bench.Task(
        "fmnist-mlp-80x3-batch50", datasets.idx_images,
        lambda: models.MLP((80, 80, 80)), 50, max(1, int(3 * scale)), 0.35))
  return out


def cell(result):
  """``epochs to target (final train loss)``; ``-`` where never reached."""
  final = result["final_train_loss"]
  if not np.isfinite(final):
    return "NaN"
  epochs = result["epochs_to_target"]
  return ("-" if epochs is None else f"{epochs:.2f}") + f" ({final:.3f})"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs-scale", type=float, default=1.0)
  args = parser.parse_args()
  for task in tasks(args.epochs_scale):
    data = task.dataset()
    print(f"\n### {task.name} (target train loss {task.target}, {task.epochs} "
          f"epochs, batch {task.batch_size}): epochs to target (final "
          "train loss)\n")
    print("| optimizer | " + " | ".join(f"{lr:g}" for lr in GRID)
          + " | decades reaching target |")
    print("|---|" + "---|" * (len(GRID) + 1))
    for name in ("sngd", "adam", "sgd", "muon"):
      cells, reached = [], []
      for lr in GRID:
        result = bench.train(task, data, name, lr)
        cells.append(cell(result))
        if result["epochs_to_target"] is not None:
          reached.append(lr)
      span = math.log10(max(reached) / min(reached)) if reached else 0.0
      print(f"| {name} | " + " | ".join(cells) + f" | {span:.1f} |",
            flush=True)


if __name__ == "__main__":
  main()
