"""Small models and numpy references shared by the tests."""

import jax
import jax.numpy as jnp
import optax


def mlp_params(key, sizes, dtype=jnp.float64):
  params = {}
  for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    key, k1, k2 = jax.random.split(key, 3)
    params[f"layer{i}"] = {
        "kernel": jax.random.normal(k1, (d_in, d_out), dtype) / d_in ** 0.5,
        "bias": 0.1 * jax.random.normal(k2, (d_out,), dtype),
    }
  return params


def mlp_forward(params, x, activation=jax.nn.relu):
  """Returns the logits and the activations entry of every layer."""
  acts = {}
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    h = x @ layer["kernel"] + layer["bias"]
    acts[f"layer{i}"] = {"inputs": x, "outputs": h}
    x = activation(h) if i < n - 1 else h
  return x, acts


def cross_entropy(logits, labels):
  return -jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(logits), labels[:, None], axis=1))


def blobs(key, n=256, d=10, classes=4, dtype=jnp.float64):
  """A generated nonlinear classification task."""
  k1, k2 = jax.random.split(key)
  x = jax.random.normal(k1, (n, d), dtype)
  w = jax.random.normal(k2, (d, classes), dtype)
  labels = jnp.argmax(jnp.sin(2.0 * x) @ w + x @ w, axis=1)
  return x, labels


def loss_and_acts(params, x, labels, activation=jax.nn.relu):
  logits, acts = mlp_forward(params, x, activation)
  return cross_entropy(logits, labels), jax.lax.stop_gradient(acts)


def trainer(make_tx, params, loss_fn, batches):
  """``lr -> (final params, losses)``: ``make_tx(lr)`` trained in one scan.

  ``loss_fn(params, batch)`` returns the loss and the activations; ``batches``
  has a leading steps axis. The learning rate is traced, so one compiled
  program serves every learning rate.
  """

  @jax.jit
  def run(lr):
    tx = make_tx(lr)

    def step(carry, batch):
      params, state = carry
      (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, batch)
      updates, state = tx.update(grads, state, params, activations=acts)
      return (optax.apply_updates(params, updates), state), loss

    (final, _), losses = jax.lax.scan(step, (params, tx.init(params)), batches)
    return final, losses

  return run
