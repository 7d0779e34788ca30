"""Step time of SNGD with its defaults against Adam, in one process.

The SNGD paper's MLP 784-80-80-80-10 (and the benchmark's CNNs), random
inputs of the right shape, compiled programs of 100 steps; each optimizer's
median over 5 timed calls after a warm-up. Statistics and refreshes are
included at their default intervals.

    python benchmarks/step_time.py
"""

import time

import jax
import numpy as np
import optax

import sngd_jax
from sngd_jax.bench import harness as bench
from sngd_jax.bench import models

MODELS = {
    "mlp 784-80-80-80-10": (lambda: models.MLP((80, 80, 80)), (28, 28)),
    "fmnist-cnn": (lambda: models.CNN((16, 32), kernel=3, spatial=2), (28, 28)),
    "mnist1d-cnn": (models.CNN, (40,)),
}


def step_ms(model, tx, needs_activations, xs, ys, repeats=5):
  task = bench.Task("step-time", None, None, xs.shape[1], 1, 0.0)
  chunk, _ = bench.make_chunk(task, model, tx, needs_activations)
  variables = model.init(jax.random.PRNGKey(0), xs[0])
  carry = (variables, tx.init(variables["params"]))
  carry = jax.block_until_ready(chunk(*carry, xs, ys)[:2])
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    carry = jax.block_until_ready(chunk(*carry, xs, ys)[:2])
    times.append(time.perf_counter() - start)
  return 1e3 * np.median(times) / xs.shape[0]


def main():
  print("| model | batch | Adam step (ms) | sngd(0.1) / Adam | "
        "sngd(0.1, momentum=0.9) / Adam |")
  print("|---|---|---|---|---|")
  for name, (make, shape) in MODELS.items():
    for batch in (50, 128):
      model = make()
      xs = jax.random.uniform(jax.random.PRNGKey(0), (100, batch) + shape)
      ys = jax.random.randint(jax.random.PRNGKey(1), (100, batch), 0, 10)
      adam = step_ms(model, optax.adam(1e-3), False, xs, ys)
      plain = step_ms(model, sngd_jax.sngd(0.1), True, xs, ys)
      momentum = step_ms(model, sngd_jax.sngd(0.1, momentum=0.9), True, xs, ys)
      print(f"| {name} | {batch} | {adam:.3f} | {plain / adam:.2f} | "
            f"{momentum / adam:.2f} |", flush=True)


if __name__ == "__main__":
  main()
