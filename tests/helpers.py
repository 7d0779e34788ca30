"""Small models and numpy references shared by the tests."""

import jax
import jax.numpy as jnp


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


def train(tx, params, x, labels, steps, activation=jax.nn.relu):
  """Full-batch training; returns the final params and the loss history."""
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels, activation)
    updates, state = tx.update(grads, state, params, activations=acts)
    return jax.tree.map(lambda p, u: p + u, params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses
