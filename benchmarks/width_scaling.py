"""Step time and optimizer-state memory of SNGD relative to Adam as an MLP widens.

MLP 784-w-w-10 for w in 128..4096, batch 128, one process, same data. SNGD
runs with the benchmark's amortization (statistics every 10 steps, inverses
every 50), with exact blocks and with rank-128 Nystrom blocks for layers wider
than 512 inputs. The step time is the mean over 100 steps (so it includes two
refreshes and ten statistics updates), after a warm-up call.

    python benchmarks/width_scaling.py [--widths 128 512 ...] [--steps 100]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import sngd_jax
from sngd_jax.bench import harness as bench
from sngd_jax.bench import models

AMORTIZED = dict(momentum=0.9, ema_decay=0.9, stats_every=10, inverse_every=50)


def optimizers():
  return {
      "adam": (optax.adam(1e-3), False),
      "sngd exact": (sngd_jax.sngd(0.03, **AMORTIZED), True),
      "sngd nystrom-128": (sngd_jax.sngd(
          0.03, nystrom=sngd_jax.Nystrom(rank=128, min_dim=512), **AMORTIZED), True),
  }


def measure(width, tx, needs_activations, steps, batch=128):
  """Mean step time (ms) and optimizer-state bytes, with the benchmark's step."""
  model = models.MLP((width, width))
  x = jax.random.normal(jax.random.PRNGKey(0), (steps, batch, 784))
  y = jax.random.randint(jax.random.PRNGKey(1), (steps, batch), 0, 10)
  variables = model.init(jax.random.PRNGKey(2), x[0])
  state = tx.init(variables["params"])
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  task = bench.Task("width", None, None, batch, epochs=1, target=0.0)
  chunk, _ = bench.make_chunk(task, model, tx, needs_activations)
  # Compile and warm up on copies (the chunk donates its params and state).
  jax.block_until_ready(chunk(*jax.tree.map(jnp.copy, (variables, state)), x, y))
  start = time.perf_counter()
  jax.block_until_ready(chunk(variables, state, x, y))
  return 1e3 * (time.perf_counter() - start) / steps, state_bytes


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="*", default=[128, 512, 1024, 2048, 4096])
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{jax.devices()[0].device_kind}; MLP 784-w-w-10, batch 128\n")
  print("| width | adam step (ms) | sngd exact: time / Adam | memory / Adam "
        "| sngd nystrom-128: time / Adam | memory / Adam |")
  print("|---|---|---|---|---|---|")
  for width in args.widths:
    results = {name: measure(width, tx, needs, args.steps)
               for name, (tx, needs) in optimizers().items()}
    adam_ms, adam_bytes = results["adam"]
    cells = [f"{width}", f"{adam_ms:.2f}"]
    for name in ("sngd exact", "sngd nystrom-128"):
      ms, nbytes = results[name]
      cells += [f"{ms / adam_ms:.2f}", f"{nbytes / adam_bytes:.2f}"]
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
