"""A long SNGD run with injected faults: does anything ever go non-finite?

MNIST-1D MLP, 5000 steps (about 140 epochs), batch 100, the official code's
setting (plain SGD on the preconditioned gradient, lr 0.1, per-unit ReLU Fisher
on the hidden layer), default statistics and refresh intervals. Every 250th
batch has a NaN in one input and every 500th also an Inf; the whole step is
guarded by ``optax.apply_if_finite``, which rejects those steps (SNGD's own
fault counters stay 0 because the rejected step's state is discarded). Prints
the loss, test accuracy and counters every 1000 steps.

    python benchmarks/stability.py [--steps 5000]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from sngd_jax.bench import data, models


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=5000)
  args = parser.parse_args()
  d = data.mnist1d()
  model = models.MLP((100, 100))
  tx = optax.apply_if_finite(
      sngd_jax.sngd(0.1, layer_fisher={"Dense_1": "relu"}),
      max_consecutive_errors=10)
  params = model.init(jax.random.PRNGKey(0), d.x_train[:2])["params"]
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    def loss_fn(params):
      logits, acts = sngd_jax.linen_capture(model, {"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), acts
    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(0)
  batch, steps_per_epoch = 100, len(d.x_train) // 100
  for i in range(args.steps):
    if i % steps_per_epoch == 0:
      order = rng.permutation(len(d.x_train))
    idx = order[(i % steps_per_epoch) * batch:(i % steps_per_epoch + 1) * batch]
    x = d.x_train[idx].copy()
    if i % 250 == 125:
      x[0, 0] = np.nan
    if i % 500 == 375:
      x[1, 1] = np.inf
    params, state, loss = step(params, state, jnp.asarray(x), jnp.asarray(d.y_train[idx]))
    if (i + 1) % 1000 == 0:
      inner = state.inner_state[0]
      finite = all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
      logits = model.apply({"params": params}, d.x_test)
      accuracy = float(jnp.mean(jnp.argmax(logits, -1) == d.y_test))
      print(f"step {i + 1}: batch loss {float(loss):.4f}, params finite {finite}, "
            f"test acc {accuracy:.3f}, skipped steps (apply_if_finite) "
            f"{int(state.total_notfinite)}, stats faults {int(inner.stats_faults)}, "
            f"inverse faults {int(inner.inverse_faults)}", flush=True)


if __name__ == "__main__":
  main()
