"""Step time of SNGD with its defaults against Adam, in one process.

The SNGD paper's MLP 784-80-80-80-10 (and the benchmark's CNNs), random
inputs of the right shape, compiled programs of 100 steps. The optimizers'
timed calls alternate (Adam, ``sngd(0.1)``, ``sngd(0.1, momentum=0.9)``,
Adam, ...) for ``ROUNDS`` rounds after a warm-up, so that the machine's drift
(other processes, clock changes) falls on all of them alike; each ratio is the
median over the rounds of that round's ratio, with the rounds' range.
Statistics and refreshes are included at their default intervals.

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
ROUNDS = 11


def timed_call(model, tx, needs_activations, xs, ys):
  """A function that runs the 100-step program once and returns its seconds."""
  task = bench.Task("step-time", None, None, xs.shape[1], 1, 0.0)
  chunk, _ = bench.make_chunk(task, model, tx, needs_activations)
  variables = model.init(jax.random.PRNGKey(0), xs[0])
  carry = [jax.block_until_ready(
      chunk(variables, tx.init(variables["params"]), xs, ys)[:2])]

  def call():
    start = time.perf_counter()
    carry[0] = jax.block_until_ready(chunk(*carry[0], xs, ys)[:2])
    return time.perf_counter() - start

  return call


def main():
  print("| model | batch | Adam step (ms) | sngd(0.1) / Adam | "
        "sngd(0.1, momentum=0.9) / Adam |")
  print("|---|---|---|---|---|")
  for name, (make, shape) in MODELS.items():
    for batch in (50, 128):
      model = make()
      xs = jax.random.uniform(jax.random.PRNGKey(0), (100, batch) + shape)
      ys = jax.random.randint(jax.random.PRNGKey(1), (100, batch), 0, 10)
      calls = [timed_call(model, optax.adam(1e-3), False, xs, ys),
               timed_call(model, sngd_jax.sngd(0.1), True, xs, ys),
               timed_call(model, sngd_jax.sngd(0.1, momentum=0.9), True, xs,
                          ys)]
      times = np.array([[call() for call in calls] for _ in range(ROUNDS)])
      ratios = times[:, 1:] / times[:, :1]
      cells = [f"{np.median(r):.2f} ({r.min():.2f}-{r.max():.2f})"
               for r in ratios.T]
      adam_ms = 1e3 * np.median(times[:, 0]) / xs.shape[0]
      print(f"| {name} | {batch} | {adam_ms:.3f} | {cells[0]} | {cells[1]} |",
            flush=True)


if __name__ == "__main__":
  main()
