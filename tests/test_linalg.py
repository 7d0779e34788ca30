"""Denman-Beavers against eigh; Nystrom against the exact damped inverse."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import every_block_kind

import sngd_jax
from sngd_jax import linalg


def spd(n, condition, seed=0):
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  vals = np.logspace(0, -np.log10(condition), n)
  return (q * vals) @ q.T


def eigh_power(a, power):
  vals, vecs = np.linalg.eigh(a)
  return (vecs * vals ** power) @ vecs.T


@pytest.mark.parametrize("dtype,condition,tol", [
    (jnp.float64, 1e2, 1e-10), (jnp.float64, 1e6, 1e-8),
    (jnp.float32, 1e2, 1e-5), (jnp.float32, 1e6, 2e-2)])
def test_denman_beavers_matches_eigh(dtype, condition, tol):
  a = spd(24, condition) * 3.7  # not unit scale: the iteration rescales
  root, inv_root = linalg.denman_beavers(jnp.asarray(a, dtype))
  assert root.dtype == dtype and inv_root.dtype == dtype
  for got, power in ((root, 0.5), (inv_root, -0.5)):
    expected = eigh_power(a, power)
    err = np.linalg.norm(np.asarray(got, np.float64) - expected) / np.linalg.norm(expected)
    assert err < tol, (power, err)


def test_denman_beavers_float32_inverse_sqrt_whitens_at_condition_1e6():
  """What the preconditioner needs: Z A Z ~ I, eigenvalue by eigenvalue."""
  a = spd(16, 1e6)
  _, z = linalg.denman_beavers(jnp.asarray(a, jnp.float32))
  z = np.asarray(z, np.float64)
  vals = np.linalg.eigvalsh(z @ a @ z)
  np.testing.assert_allclose(vals, 1.0, atol=5e-2)


@pytest.mark.parametrize("solver", linalg.SOLVERS)
def test_solvers_invert_damped_blocks(solver):
  a = spd(10, 1e3)
  damped = np.asarray(linalg.damped(jnp.asarray(a), linalg.Damping(1e-3, 1e-2, 50)))
  shift = 1e-3 + 1e-2 * np.trace(a) / 10 + np.linalg.eigvalsh(a)[-1] / 50
  np.testing.assert_allclose(damped, a + shift * np.eye(10), rtol=1e-9)
  got = np.asarray(linalg.inverse(jnp.asarray(damped), solver))
  np.testing.assert_allclose(got @ damped, np.eye(10), atol=1e-9)


def test_inverse_metric_is_m_dot_p_inverse_m():
  """``<m, P^{-1} m>`` summed over ``m``'s columns, against NumPy's inverse."""
  p = spd(12, 1e4)
  m = np.random.default_rng(1).normal(size=(12, 5))
  np.testing.assert_allclose(
      float(linalg.inverse_metric(jnp.asarray(p), jnp.asarray(m))),
      np.sum(m * (np.linalg.inv(p) @ m)), rtol=1e-9)


@pytest.mark.parametrize("second,rtol", [(0.5, 1e-12), (0.9, 1e-2), (1.0, 1e-12)])
def test_largest_eigenvalue_is_the_top_of_eigvalsh_from_below(second, rtol):
  """16 power iterations: exact past a gap, close without one (two equal top
  eigenvalues make any vector of their plane exact), never above; the top
  eigenvector alternates in sign, orthogonal to the ones vector."""
  n = 40
  q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(n, n)))
  q[:, 0] = np.where(np.arange(n) % 2, 1.0, -1.0) / np.sqrt(n)
  q, _ = np.linalg.qr(q)
  vals = np.concatenate([[7.0, 7.0 * second], np.linspace(3.0, 1e-3, n - 2)])
  a = (q * vals) @ q.T
  got = float(linalg.largest_eigenvalue(jnp.asarray(a)))
  assert got <= 7.0 * (1 + 1e-12)
  np.testing.assert_allclose(got, 7.0, rtol=rtol)


def low_rank_plus_noise(n, rank, noise, seed=0):
  rng = np.random.default_rng(seed)
  u = rng.normal(size=(n, rank))
  return u @ u.T + noise * np.eye(n)


def nystrom_error(g, columns, shift):
  c = jnp.asarray(g[:, columns])
  basis, core, used = linalg.nystrom_factors(c, np.array(columns), shift)
  assert used == shift  # no diagonal: no spectral shift
  v = np.random.default_rng(1).normal(size=(g.shape[0], 3))
  got = np.asarray(linalg.nystrom_apply(basis, core, shift, jnp.asarray(v)))
  expected = np.linalg.solve(g + shift * np.eye(g.shape[0]), v)
  return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def test_nystrom_exact_at_full_rank():
  g = low_rank_plus_noise(40, 8, 0.0) + np.eye(40)
  assert nystrom_error(g, list(range(40)), 0.1) < 1e-9


def test_nystrom_exact_when_rank_covers_a_low_rank_matrix():
  g = low_rank_plus_noise(60, 5, 0.0)
  assert nystrom_error(g, list(range(0, 60, 6)), 0.5) < 1e-8


def test_nystrom_error_shrinks_as_rank_grows():
  g = low_rank_plus_noise(120, 30, 1e-2)
  order = np.random.default_rng(3).permutation(120)
  errors = [nystrom_error(g, sorted(order[:m]), 0.5) for m in (5, 15, 30, 60, 120)]
  assert all(b < a for a, b in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-9 and errors[0] > 1e-2, errors


def test_nystrom_cap_is_the_approximations_largest_eigenvalue_over_max_condition():
  g = low_rank_plus_noise(60, 5, 0.0)
  columns = np.arange(0, 60, 6)
  c = g[:, columns]
  approximation = c @ np.linalg.pinv(g[np.ix_(columns, columns)]) @ c.T
  _, _, used = linalg.nystrom_factors(jnp.asarray(c), columns, 0.5,
                                      max_condition=20.0)
  # Power iteration across the top two eigenvalues' gap (ratio ~0.8 here).
  np.testing.assert_allclose(
      float(used), 0.5 + np.linalg.eigvalsh(approximation)[-1] / 20, rtol=1e-4)


def test_nystrom_spectral_shift_keeps_the_trace_and_tames_missed_directions():
  # Not low-rank: 8 large eigenvalues over a flat tail that 16 columns miss.
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  g = q @ np.diag([100.0] * 8 + [1.0] * 56) @ q.T
  columns = np.sort(rng.permutation(64)[:16])
  shift = 1e-2
  c = jnp.asarray(g[:, columns])
  basis, core, total = linalg.nystrom_factors(c, columns, shift,
                                              jnp.asarray(np.diag(g)))
  basis = np.asarray(basis)
  # The residual's mean eigenvalue, added to the shift, restores the trace.
  np.testing.assert_allclose(
      np.trace(basis @ basis.T) + (float(total) - shift) * 48, np.trace(g),
      rtol=1e-9)
  v = rng.normal(size=(64, 3))
  exact = np.linalg.solve(g + shift * np.eye(64), v)
  shifted = np.asarray(linalg.nystrom_apply(basis, core, total, v))
  plain_basis, plain_core, _ = linalg.nystrom_factors(c, columns, shift)
  plain = np.asarray(linalg.nystrom_apply(plain_basis, plain_core, shift, v))
  # Without the shift the missed directions get 1/shift = 100 times the step
  # the tail's curvature (1) allows; with it, the step is of the right size.
  assert np.linalg.norm(plain) > 30 * np.linalg.norm(exact)
  assert np.linalg.norm(shifted) < 1.5 * np.linalg.norm(exact)
  assert (np.linalg.norm(shifted - exact) / np.linalg.norm(exact)
          < 0.1 * np.linalg.norm(plain - exact) / np.linalg.norm(exact))


@pytest.mark.parametrize("dtype,in_span,relative_shift,rtol", [
    (jnp.float64, False, None, 1e-10), (jnp.float64, True, None, 1e-8),
    (jnp.float32, False, None, 1e-5),
    # v in the top directions at the shift relative_damping=1e-2 gives this
    # block (56): the difference keeps ~4 digits in float32 (3.5e-5 measured).
    # At the fixed shift 1e-2 (relative damping ~1e-5) it keeps none: its
    # error is a few float32 ulps of |v|^2 / shift, as large as the result,
    # and Woodbury's direction itself is 5% off there.
    (jnp.float32, True, 1e-2, 1e-3)])
def test_nystrom_quadratic_is_v_dot_pv_of_the_explicit_approximation(
    dtype, in_span, relative_shift, rtol):
  # Eigenvalues ~1e4 over a shift of 1e-2, as a pixel layer's top directions
  # over a small absolute damping.
  g = 1e3 * low_rank_plus_noise(50, 6, 1e-1, seed=5)
  columns = np.arange(0, 50, 5)
  shift = 1e-2 if relative_shift is None else float(
      linalg.Damping(0.0, relative_shift).shift(np.trace(g), 50))
  basis, core, _ = linalg.nystrom_factors(jnp.asarray(g[:, columns], dtype),
                                          columns, shift)
  b = np.asarray(basis, np.float64)
  rng = np.random.default_rng(6)
  v = b @ rng.normal(size=(b.shape[1], 4)) if in_span else rng.normal(size=(50, 4))
  expected = np.sum(v * np.linalg.solve(b @ b.T + shift * np.eye(50), v))
  got = linalg.nystrom_quadratic(basis, core, shift, jnp.asarray(v, dtype))
  assert got.dtype == dtype
  np.testing.assert_allclose(float(got), expected, rtol=rtol)


def spiked(n, spikes, seed=0):
  """A PSD matrix whose eigenvalues are ``spikes`` and ``n - len(spikes)``
  ones (the rest flat), in random directions."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return (q * np.concatenate([spikes, np.ones(n - len(spikes))])) @ q.T


def exact_output_roots(r, weight, power, clip):
  """``output_roots``' formula by numpy's eigh."""
  r = r / (np.trace(r) / len(r))
  r = weight * r + (1 - weight) * np.eye(len(r))
  return eigh_power_clipped(r, -power, clip), eigh_power_clipped(r, power / 2, clip)


def eigh_power_clipped(a, power, clip):
  vals, vecs = np.linalg.eigh(a)
  return (vecs * np.clip(vals, *clip) ** power) @ vecs.T


@pytest.mark.parametrize("rank,iterations,dtype,tol", [
    (6, 2, jnp.float64, 1e-2), (6, 16, jnp.float64, 1e-10),
    (10, 16, jnp.float64, 1e-10), (6, 16, jnp.float32, 1e-5)])
def test_low_rank_output_roots_are_exact_where_the_rest_is_flat(
    rank, iterations, dtype, tol):
  """R with 6 spikes (30-900x the rest) and the rest equal: its top
  eigenpairs and the rest's mean are R, so the low-rank roots are R's roots
  (to the subspace iteration's convergence: once shrunk toward I with
  weight 0.9 the smallest spike is 6.5x the rest, an error of
  ``6.5^-(iterations + 1)``); the largest eigenvalue is clipped."""
  spikes = np.geomspace(30, 900, 6)
  r = spiked(48, spikes) * 2.5
  clip = (1 / 16, 16.0)
  expected = exact_output_roots(r, 0.9, 0.5, clip)
  got = linalg.output_roots(jnp.asarray(r, dtype), 0.9, 0.5, clip, rank,
                           iterations)
  assert all(g.dtype == dtype for g in got)
  assert 0.9 * np.linalg.eigvalsh(r)[-1] / np.trace(r) * 48 + 0.1 > clip[1]
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), e, atol=tol)


def test_low_rank_output_roots_keep_the_trace_and_the_top_eigenvalues():
  """On a spread spectrum (no flat rest), the approximation ``R~`` (power
  -1 returns it) keeps R's trace, its top eigenvalues are R's to the
  iteration's convergence, and the rest is flat at the rest's mean."""
  r = spd(64, 1e3, seed=3)
  r = r / (np.trace(r) / 64)
  wide = (1e-9, 1e9)
  approx, _ = linalg.output_roots(jnp.asarray(r), 1.0, -1.0, wide, 16, 8)
  vals = np.linalg.eigvalsh(np.asarray(approx))[::-1]
  exact = np.linalg.eigvalsh(r)[::-1]
  np.testing.assert_allclose(np.trace(np.asarray(approx)), 64, rtol=1e-12)
  np.testing.assert_allclose(vals[:4], exact[:4], rtol=1e-6)
  np.testing.assert_allclose(vals[16:], (64 - vals[:16].sum()) / 48, rtol=1e-9)
  assert np.linalg.norm(np.asarray(approx) - r) < 0.3 * np.linalg.norm(r)


def product_precisions(jaxpr):
  """The ``precision`` of every matrix product and convolution in ``jaxpr``."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      yield eqn.params["precision"]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from product_precisions(getattr(sub, "jaxpr", sub))


def test_every_product_is_exact_to_float32_under_a_low_precision_default():
  """Under TensorFloat-32 (GPUs) or one bfloat16 pass (TPUs), JAX's default
  float32 products keep ~3 digits, which an inverse amplifies by the block's
  condition number: every product of an update (statistics, refreshes of
  every block kind, the step, the KL clip, momentum) and of the linear
  algebra asks for float32. CPUs ignore the setting, so the program is read."""
  layers, entries, params = every_block_kind(unseen_rows=True)
  tx = sngd_jax.sngd(0.1, momentum=0.9,
                     layer_fisher={"head": "softmax", "units": "relu"},
                     nystrom=sngd_jax.Nystrom(rank=8, min_dim=32))
  grads = jax.tree.map(jnp.ones_like, params)
  a = jnp.asarray(spd(8, 1e3), jnp.float32)
  columns = a[:, :3]
  programs = {
      "update": (lambda g, s, p, acts: tx.update(g, s, p, activations=acts),
                 grads, tx.init(params), params, entries),
      **{name: (getattr(linalg, name), a) for name in
         ("eigh_inverse", "denman_beavers", "denman_beavers_inverse")},
      "output_roots": (lambda m: linalg.output_roots(m, 0.5, 0.5, (1e-3, 1e3)), a),
      "nystrom": (lambda c: linalg.nystrom_quadratic(
          *linalg.nystrom_factors(c, jnp.arange(3), 1e-2), c), columns),
      "nystrom_apply": (lambda c: linalg.nystrom_apply(
          *linalg.nystrom_factors(c, jnp.arange(3), 1e-2), c), columns),
  }
  highest = (jax.lax.Precision.HIGHEST,) * 2
  for name, (program, *args) in programs.items():
    with jax.default_matmul_precision("bfloat16"):
      precisions = list(product_precisions(jax.make_jaxpr(program)(*args).jaxpr))
    assert precisions, name
    assert all(p == highest for p in precisions), (name, set(precisions))
