"""The output factor: the output side of a Kronecker block, from the gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_exact_ngd import FORMULA, damp, stacked, with_ones

import sngd_jax
from sngd_jax import linalg, transform

FACTOR = {**FORMULA, "output_factor": True}


def clipped_power(r, power, low=1 / 16, high=16.0):
  """``r^power`` with ``r``'s eigenvalues clipped to [low, high] first."""
  eigvals, eigvecs = np.linalg.eigh(r)
  return (eigvecs * np.clip(eigvals, low, high) ** power) @ eigvecs.T


def test_direction_is_input_inverse_times_gradient_times_output_root():
  """One batch (no EMA): ``v = A^-1 g R^-1/2`` with ``R = sym(u^T g)``, ``u = A^-1 g``,
  divided by its mean eigenvalue; the buffer's metric is ``A (x) R^1/2``."""
  params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (4, 5)),
                      "bias": jnp.zeros(5)}}
  x = jax.random.normal(jax.random.PRNGKey(1), (9, 4), jnp.float64)
  grads = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (4, 5)),
                     "bias": jax.random.normal(jax.random.PRNGKey(3), (5,))}}
  tx = sngd_jax.scale_by_sngd(**FACTOR)
  acts = {"dense": {"inputs": x}}
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)

  xt = with_ones(np.asarray(x))
  a = damp(xt.T @ xt / len(xt))
  g = stacked(grads["dense"])
  u = np.linalg.solve(a, g)
  r = (u.T @ g + g.T @ u) / 2
  r /= np.trace(r) / len(r)
  np.testing.assert_allclose(stacked(updates["dense"]), u @ clipped_power(r, -0.5),
                             rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(state.output_factors["dense"][1],
                             clipped_power(r, 0.25), rtol=1e-9, atol=1e-12)
  # A layer of the input side alone is the same direction without the root.
  plain = sngd_jax.scale_by_sngd(**FORMULA)
  updates, _ = plain.update(grads, plain.init(params), params, activations=acts)
  np.testing.assert_allclose(stacked(updates["dense"]), u, rtol=1e-9)


def test_factor_recovers_the_output_side_of_a_gaussian_likelihood():
  """At the optimum of ``-log N(y; W^T x~, C)`` the Fisher is ``E[x~ x~^T] (x) C^-1``.

  The EMA of ``sym((A^-1 g)^T g)`` over mini-batches must converge to ``C^-1``
  (up to scale): ``R^-1/2`` to ``(C^-1 / mean eig)^-1/2``. With the input side
  alone (``R = I``) the difference would be 0.4-2x.
  """
  d_in, d_out, batch, steps = 3, 3, 32, 400
  rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(d_out, d_out)))[0]
  precision = (rotation * np.array([0.25, 1.0, 4.0])) @ rotation.T  # C^-1
  cov_root = np.linalg.cholesky(np.linalg.inv(precision))
  true_w = {"kernel": jnp.asarray(np.random.default_rng(1).normal(size=(d_in, d_out))),
            "bias": jnp.ones(d_out)}
  tx = sngd_jax.scale_by_sngd(**{**FACTOR, "ema_decay": 0.99})

  def nll(w, x, y):
    residual = y - x @ w["kernel"] - w["bias"]
    return 0.5 * jnp.mean(jnp.einsum("bi,ij,bj->b", residual, precision, residual))

  @jax.jit
  def step(state, key):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (batch, d_in), jnp.float64)
    y = (x @ true_w["kernel"] + true_w["bias"]
         + jax.random.normal(ky, (batch, d_out), jnp.float64) @ cov_root.T)
    grads = {"dense": jax.grad(nll)(true_w, x, y)}
    _, state = tx.update(grads, state, {"dense": true_w},
                         activations={"dense": {"inputs": x}})
    return state

  state = tx.init({"dense": true_w})
  for key in jax.random.split(jax.random.PRNGKey(2), steps):
    state = step(state, key)
  expected = clipped_power(precision / np.trace(precision) * d_out, -0.5)
  got = np.asarray(state.output_factors["dense"][0])
  error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
  assert error < 0.1, (error, got, expected)


def test_factor_ema_is_bias_corrected_and_shrunk_toward_the_identity():
  """After k statistics the factor is ``R = w M + (1 - w) I`` with ``w = 1 - decay^k``
  and ``M`` the bias-corrected EMA of ``sym(u^T g)``, divided by its mean
  eigenvalue (``u`` the input side's direction, tested on its own elsewhere)."""
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  tx = sngd_jax.scale_by_sngd(**{**FACTOR, "ema_decay": 0.75})
  state = tx.init(params)
  raw = np.zeros((4, 4))
  for k in range(1, 4):
    x = jax.random.normal(jax.random.PRNGKey(k), (6, 3), jnp.float64)
    grads = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(10 + k), (3, 4)),
                       "bias": jax.random.normal(jax.random.PRNGKey(20 + k), (4,))}}
    _, state = tx.update(grads, state, params, activations={"dense": {"inputs": x}})
    g = stacked(grads["dense"])
    u = np.asarray(state.preconditioners["dense"]) @ g
    raw = 0.75 * raw + 0.25 * (u.T @ g + g.T @ u) / 2
    weight = 1 - 0.75 ** k
    mean = raw / weight
    shrunk = weight * mean / (np.trace(mean) / 4) + (1 - weight) * np.eye(4)
    np.testing.assert_allclose(state.output_stats["dense"], raw, rtol=1e-9)
    np.testing.assert_allclose(state.output_factors["dense"][0],
                               clipped_power(shrunk, -0.5), rtol=1e-9, atol=1e-12)


def test_a_wide_layers_factor_keeps_its_top_eigenpairs_and_the_rests_mean(
    monkeypatch):
  """Above ``OUTPUT_EXACT_DIM`` outputs (lowered to 3 here, rank 2) the
  factor's R is its top eigenpairs and, in the other directions, the rest's
  mean eigenvalue (converged: many iterations): against numpy's eigh."""
  monkeypatch.setattr(transform, "OUTPUT_EXACT_DIM", 3)
  monkeypatch.setattr(transform, "OUTPUT_RANK", 2)
  monkeypatch.setattr(transform.linalg, "output_roots", functools.partial(
      linalg.output_roots, iterations=60))
  params = {"dense": {"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)}}
  tx = sngd_jax.scale_by_sngd(**{**FACTOR, "ema_decay": 0.1})
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 3), jnp.float64)
  grads = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (3, 5)),
                     "bias": jax.random.normal(jax.random.PRNGKey(3), (5,))}}
  _, state = tx.update(grads, tx.init(params), params,
                       activations={"dense": {"inputs": x}})
  g = stacked(grads["dense"])
  u = np.asarray(state.preconditioners["dense"]) @ g
  mean = (u.T @ g + g.T @ u) / 2
  shrunk = 0.9 * mean / (np.trace(mean) / 5) + 0.1 * np.eye(5)
  vals, vecs = np.linalg.eigh(shrunk)
  assert vals[-2] > 1.5 * vals[-3]  # the top two are well separated
  vals[:3] = vals[:3].mean()
  expected = (vecs * np.clip(vals, 1 / 16, 16) ** -0.5) @ vecs.T
  got = np.asarray(state.output_factors["dense"][0])
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  assert np.abs(got - clipped_power(shrunk, -0.5)).max() > 1e-3  # not exact


def test_an_int_output_factor_caps_the_widest_layer_given_one():
  """``output_factor=4``: the 3-output layer gets the factor, the 6-output
  one steps as the input side alone does; 0, negative and fractional caps
  are refused."""
  params = {"wide": {"kernel": jnp.zeros((3, 6)), "bias": jnp.zeros(6)},
            "narrow": {"kernel": jnp.zeros((6, 3)), "bias": jnp.zeros(3)}}
  grads = jax.tree.map(lambda x: jax.random.normal(
      jax.random.PRNGKey(x.size), x.shape, jnp.float64), params)
  acts = {"wide": {"inputs": jax.random.normal(jax.random.PRNGKey(1), (9, 3),
                                               jnp.float64)},
          "narrow": {"inputs": jax.random.normal(jax.random.PRNGKey(2), (9, 6),
                                                 jnp.float64)}}
  updates = {}
  for option in (True, False, 4):
    tx = sngd_jax.scale_by_sngd(**{**FACTOR, "output_factor": option})
    state = tx.init(params)
    assert sorted(state.output_factors) == {
        True: ["narrow", "wide"], False: [], 4: ["narrow"]}[option]
    updates[option], _ = tx.update(grads, state, params, activations=acts)
  np.testing.assert_allclose(stacked(updates[4]["wide"]),
                             stacked(updates[False]["wide"]), rtol=1e-12)
  np.testing.assert_allclose(stacked(updates[4]["narrow"]),
                             stacked(updates[True]["narrow"]), rtol=1e-12)
  assert not np.allclose(stacked(updates[True]["narrow"]),
                         stacked(updates[False]["narrow"]))
  for bad in (0, -1, 2.5):
    with pytest.raises(ValueError, match="output_factor must be"):
      sngd_jax.scale_by_sngd(output_factor=bad)
