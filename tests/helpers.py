"""Small models and numpy references shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax


def assert_tree_close(a, b, **tolerances):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **tolerances),
               a, b)


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


def every_block_kind(units="relu", norms=1, exact=1, unseen_rows=False):
  """One layer of each block kind and an activations entry for each.

  An embedding used by lookups and ``attend``, ``norms`` norms of one width,
  a softmax head, per-unit blocks (``units``), ``exact`` exact blocks of one
  size and a Nystrom block; with ``unseen_rows``, an embedding whose few
  lookups leave most rows unseen. Returns ``(layers, entries, params)``.
  """
  def dense(d_in, d_out):
    return {"kernel": jnp.zeros((d_in, d_out)), "bias": jnp.zeros(d_out)}

  params = {"embed": {"embedding": jnp.zeros((12, 6))},
            **({"lookups": {"embedding": jnp.zeros((12, 6))}} if unseen_rows else {}),
            **{f"norm{i}": {"scale": jnp.ones(6), "bias": jnp.zeros(6)}
               for i in range(norms)},
            "head": dense(6, 5), "units": dense(6, 7),
            **{f"exact{i}": dense(9, 4) for i in range(exact)},
            "wide": dense(40, 3)}
  layers, _ = sngd_jax.transform.plan_layers(
      params, {"head": "softmax", "units": units, "*": "linear"},
      sngd_jax.Nystrom(rank=8, min_dim=32))
  key = jax.random.PRNGKey(0)
  entries = {"embed": {"inputs": jax.random.randint(key, (32, 3), 0, 12),
                       "attend": jax.random.normal(key, (32, 3, 6))},
             "lookups": {"inputs": jax.random.randint(key, (4,), 0, 12)}}
  for i, layer in enumerate(layers):
    if layer.path not in entries:
      k = jax.random.fold_in(key, i)
      width = layer.d_out if layer.kind == "affine" else layer.d_in
      entries[layer.path] = {"inputs": jax.random.normal(k, (32, width)),
                             "outputs": jax.random.normal(k, (32, layer.d_out))}
  return layers, {layer.path: entries[layer.path] for layer in layers}, params
