"""Linear algebra for local Fisher blocks: damping, inverses, roots, Nystrom.

Every function here takes a symmetric positive semi-definite block ``g`` (or a
batch of them, through ``jax.vmap``) and returns the matrix that the
preconditioner multiplies gradients by. Work is done in float32 or wider,
whatever the dtype of the parameters, and every matrix product here is exact
to float32 (:func:`full_precision`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax import split

SOLVERS = ("cholesky", "eigh", "denman_beavers")


def full_precision(function):
  """``function`` with its float32 matrix products exact to float32.

  JAX's default multiplies float32 matrices in TensorFloat-32 on recent NVIDIA
  GPUs and in one bfloat16 pass on TPUs: about three significant digits. An
  inverse or a root amplifies that rounding by the block's condition number
  (up to ~1/relative_damping), and a statistic rounded so can lose the small
  eigenvalues that its inverse is most sensitive to. The blocks are small
  next to the layers they precondition: on an H200 the exact products cost
  the benchmark language model's whole step 3%.
  """

  @functools.wraps(function)
  def exact(*args, **kwargs):
    with jax.default_matmul_precision("float32"):
      return function(*args, **kwargs)

  return exact


class Damping(NamedTuple):
  """What a block's diagonal is shifted by before it is inverted.

  ``absolute + relative * trace(G) / dim + largest_eigenvalue(G) / max_condition``.
  The last term caps the damped block's condition number near
  ``max_condition``: without it, a block whose spectrum spans many decades
  (a dense head on 1569 convolutional features: largest/mean eigenvalue
  1144) is damped at a tiny fraction of its scale and its weakest
  directions take steps the loss cannot bear. Fields may be traced
  (``optax.inject_hyperparams``, the young EMA's warm-up); ``max_condition``
  None: no cap.
  """

  absolute: Any
  relative: Any
  max_condition: Any = None

  def shift(self, trace, dim, largest: Callable[[], Any] | None = None):
    """The shift of a block with this ``trace`` and ``dim``; ``largest``
    computes its largest eigenvalue, called only where there is a cap (an
    uncapped ``Damping`` needs none)."""
    shift = self.absolute + self.relative * trace / dim
    if self.max_condition is None:
      return shift
    if largest is None:
      raise ValueError("a capped Damping needs the block's largest eigenvalue")
    return shift + largest() / self.max_condition

  def uncapped(self) -> Damping:
    return self._replace(max_condition=None)


@full_precision
def largest_eigenvalue(g, iterations: int = 16):
  """The largest eigenvalue of a PSD block ``(n, n)``, from below, by power iteration.

  It starts from a fixed random vector (no structure of a block, centred
  inputs or alternating signs, can make it orthogonal to the top
  eigenvector). Unrolled, on XLA:CPU it cost a 101-row block 40 us against
  its Cholesky inverse's 107, a 513-row one 235 us against 5.3 ms; as a
  loop its program is one step (the unrolled steps were a quarter of the
  update's compile time on an MLP of six block sizes). The Rayleigh quotient's error
  after k steps is of order ``(lambda_2 / lambda_1)^(2k)``; an
  underestimate only weakens the cap.
  """
  start = np.random.default_rng(0).standard_normal(g.shape[-1])
  v = jnp.asarray(start / np.linalg.norm(start), g.dtype)
  def step(_, v):
    w = g @ v
    return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(g.dtype).tiny)

  v = jax.lax.fori_loop(0, iterations, step, v)
  return jnp.vdot(v, g @ v)


def damped(g, damping: Damping, dim=None):
  """``g + damping.shift(trace(g), dim) * I``; ``dim`` (may be traced) where
  ``g`` is a smaller block padded with zeros (its own size), else its size.

  Padded, the block's own corner is damped as it would be alone (the zeros
  change neither its trace nor its largest eigenvalue) and inverts
  independently of the rest, a multiple of ``I``.
  """
  dim = g.shape[-1] if dim is None else dim
  shift = damping.shift(jnp.trace(g), dim, lambda: largest_eigenvalue(g))
  return g + shift * jnp.eye(g.shape[-1], dtype=g.dtype)


def _identity_if_none(a, rhs):
  return jnp.eye(a.shape[-1], dtype=a.dtype) if rhs is None else rhs


def cholesky_inverse(a, rhs=None):
  """``A^{-1} rhs`` (the inverse, without ``rhs``) of a symmetric positive
  definite matrix through Cholesky."""
  chol = jax.scipy.linalg.cho_factor(a, lower=True)
  return jax.scipy.linalg.cho_solve(chol, _identity_if_none(a, rhs))


def inverse_metric(p, m):
  """``<m, P^{-1} m>`` of a symmetric positive definite ``P``: ``|L^{-1} m|^2``
  with ``P = L L^T``, one triangular solve (not ``cholesky_inverse``'s two)
  and a sum of squares, never negative."""
  chol = jnp.linalg.cholesky(p)
  solved = jax.scipy.linalg.solve_triangular(chol, m, lower=True)
  return jnp.sum(jnp.square(solved))


def _rejected_unless(ok, x):
  """``x``, or NaN where ``ok`` is False: the caller's finiteness check rejects it."""
  return jnp.where(ok, x, jnp.nan)


@full_precision
def eigh_inverse(a, rhs=None):
  """``A^{-1} rhs`` (the inverse, without ``rhs``) through ``eigh``.

  A damped block has eigenvalues of at least its damping; an ``eigh`` that
  returns one at or below zero (rounding on an ill-conditioned block) would
  give an indefinite inverse, an ascent direction: the result is rejected.
  """
  eigvals, eigvecs = jnp.linalg.eigh(a)
  right = eigvecs.T if rhs is None else eigvecs.T @ rhs
  return _rejected_unless(jnp.min(eigvals) > 0, (eigvecs / eigvals) @ right)


@full_precision
def denman_beavers(a, iterations: int = 24):
  """Square root and inverse square root by the Denman-Beavers iteration.

  ``Y0 = A / c, Z0 = I; Y <- (Y + Z^-1) / 2, Z <- (Z + Y^-1) / 2`` with
  ``c = trace(A) / dim`` so that the iteration starts from a matrix of unit
  average eigenvalue (the iteration is scale-sensitive, not scale-variant).
  Convergence is quadratic once the eigenvalues of Y are near one; 24
  iterations cover condition numbers well past 1e8.

  Args:
    a: symmetric positive definite matrix ``(n, n)``.
    iterations: fixed number of iterations (fixed so that it runs under jit).

  Returns:
    ``(sqrt(A), inverse_sqrt(A))``.
  """
  scale = jnp.trace(a) / a.shape[-1]
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)

  def step(_, yz):
    y, z = yz
    y_next = 0.5 * (y + jnp.linalg.inv(z))
    z_next = 0.5 * (z + jnp.linalg.inv(y))
    # Symmetrize: rounding makes the iterates drift from symmetry.
    return 0.5 * (y_next + y_next.T), 0.5 * (z_next + z_next.T)

  # Z0 made from A: inside shard_map it then varies over the axes A does.
  y, z = jax.lax.fori_loop(0, iterations, step,
                           (a / scale, jnp.zeros_like(a) + eye))
  root = jnp.sqrt(scale)
  return y * root, z / root


@full_precision
def denman_beavers_inverse(a, rhs=None, tolerance: float = 1e-3):
  """``A^{-1/2} A^{-1/2} rhs`` (the inverse, without ``rhs``): the
  reconstruction's map.

  Rejected (NaN) unless the iteration converged: the residual
  ``||A^{-1/2} A A^{-1/2} - I||_F / sqrt(n)`` must be below ``tolerance``.
  """
  _, inv_sqrt = denman_beavers(a)
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  residual = jnp.linalg.norm(inv_sqrt @ a @ inv_sqrt - eye) / jnp.sqrt(
      a.shape[-1])
  right = inv_sqrt if rhs is None else inv_sqrt @ rhs
  return _rejected_unless(residual < tolerance, inv_sqrt @ right)


def inverse(a, solver: str, rhs=None):
  """``A^{-1} rhs`` (the inverse, without ``rhs``) of a damped block with the
  named solver: ``rhs``, some columns of the identity, is how a device
  computes its columns of a divided refresh."""
  if solver == "cholesky":
    return cholesky_inverse(a, rhs)
  if solver == "eigh":
    return eigh_inverse(a, rhs)
  if solver == "denman_beavers":
    return denman_beavers_inverse(a, rhs)
  raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


@full_precision
def output_roots(mean, weight, power, eigenvalue_range, rank=None,
                 iterations: int = 2, axis_name=None):
  """The output side's factor from its EMA: ``(R^{-power}, R^{power/2})``.

  ``mean`` is the bias-corrected mean of ``sym(v^T g)`` (``(d_out, d_out)``);
  ``R`` is it divided by its mean eigenvalue (so the layer's step keeps the
  input side's scale), shrunk toward ``I`` with weight ``1 - weight`` while
  few statistics are in it, with eigenvalues clipped to
  ``eigenvalue_range``. Directions are multiplied by the first matrix; a
  buffer measured in the metric is multiplied by the second, since
  ``|m|^2`` in ``A (x) R^power`` is ``|m R^{power/2}|^2`` in ``A``. Non-finite
  where the eigendecomposition failed.

  With a ``rank`` below ``d_out``, R is replaced by its ``rank`` largest
  eigenpairs, found by subspace iteration (``iterations`` products after the
  first, Halko, Martinsson & Tropp 2011), and the rest of its spectrum by
  that rest's mean eigenvalue, so the approximation keeps R's trace (as
  :func:`nystrom_factors`' spectral shift does): O(d_out^2 rank) matrix
  products instead of an ``eigh`` of ``d_out x d_out`` (9 d_out^3), exact
  where R's other eigenvalues are equal. There the devices of a bound
  ``axis_name`` (``sngd_jax.split``) divide the ``d_out x d_out`` products
  by rows; the result is whole on every device.
  """
  dim = mean.shape[-1]
  eye = jnp.eye(dim, dtype=mean.dtype)
  scale = jnp.trace(mean) / dim
  # No gradient seen yet (a zero mean): no output-side information, R = I.
  relative = jnp.where(scale > 0, mean / jnp.where(scale > 0, scale, 1), eye)
  shrunk = weight * relative + (1 - weight) * eye
  if rank is None or rank >= dim:
    eigvals, eigvecs = jnp.linalg.eigh(shrunk)
    eigvals = jnp.clip(eigvals, *eigenvalue_range)
    return ((eigvecs * eigvals ** -power) @ eigvecs.T,
            (eigvecs * eigvals ** (power / 2)) @ eigvecs.T)

  def times(a, b):  # a @ b, each device its rows of a
    if axis_name is None:
      return a @ b
    return split.by_rows(lambda rows: rows @ b, a, axis_name)

  start = np.random.default_rng(0).standard_normal((dim, rank))
  basis = jnp.linalg.qr(times(shrunk, jnp.asarray(start, mean.dtype)))[0]
  basis = jax.lax.fori_loop(
      0, iterations, lambda _, q: jnp.linalg.qr(times(shrunk, q))[0], basis)
  projected = basis.T @ times(shrunk, basis)
  eigvals, eigvecs = jnp.linalg.eigh(0.5 * (projected + projected.T))
  eigvecs = basis @ eigvecs
  # R's trace is dim (its mean eigenvalue 1).
  rest = jnp.clip((dim - jnp.sum(eigvals)) / (dim - rank), *eigenvalue_range)
  eigvals = jnp.clip(eigvals, *eigenvalue_range)

  def function(p):  # R^p = rest^p I + U (s^p - rest^p) U^T
    return rest ** p * eye + times(eigvecs * (eigvals ** p - rest ** p),
                                   eigvecs.T)

  return function(-power), function(power / 2)


@full_precision
def nystrom_factors(columns, column_index, shift, diagonal=None,
                    axis_name=None, max_condition=None, size=None):
  """Woodbury factors of ``(shift * I + C W^+ C^T)^{-1}``.

  The Nystrom approximation of a PSD matrix G from m of its columns
  ``C = G[:, S]`` (with ``W = G[S, S]``) is ``C W^+ C^T = B B^T`` with
  ``B = C V s^{-1/2}`` from the eigenpairs ``(s, V)`` of W (eigenvalues below
  ``eps * m * max(s)`` are dropped: that is the pseudo-inverse). By Woodbury,
  ``(shift I + B B^T)^-1 v = (v - B (shift I + B^T B)^-1 B^T v) / shift``:
  O(n m^2 + m^3) instead of O(n^3), and well defined for a singular W.

  The approximation drops the PSD residual ``G - B B^T``; in the directions
  the sampled columns miss, its inverse is ``1 / shift``, a far larger step
  than the curvature there allows when G is not low-rank. Given G's
  ``diagonal``, the residual is replaced by its mean eigenvalue
  ``(trace G - trace B B^T) / (n - m)`` times I, added to the shift (spectral
  shifting, Wang et al. 2014): the approximation keeps G's trace.

  Args:
    columns: ``C``, shape ``(n, m)``.
    column_index: ``S``, integer array ``(m,)``: which rows of C form W.
    shift: the damping, a positive scalar.
    diagonal: G's diagonal ``(n,)``, for the spectral shift; ``None``: none.
    axis_name: a bound device axis (``sngd_jax.split``) whose devices divide
      the O(n m^2) products by rows; the result is whole on every device.
    max_condition: adds ``lambda_max(B B^T) / max_condition`` to the shift
      (``Damping``'s cap; ``B B^T`` has ``B^T B``'s nonzero eigenvalues).
    size: G's own size (may be traced) where ``columns`` and ``diagonal``
      are padded with zero rows; the padded rows of ``B`` are zero.

  Returns:
    ``(basis, core, shift)``: ``B (n, m)``, ``(shift I + B^T B)^{-1} (m, m)``
    and the shift used (with the spectral shift).
  """
  w = columns[column_index]
  vals, vecs = jnp.linalg.eigh(0.5 * (w + w.T))
  cutoff = jnp.finfo(w.dtype).eps * w.shape[0] * jnp.max(vals)
  inv_sqrt = jnp.where(vals > cutoff, 1.0 / jnp.sqrt(jnp.maximum(vals, cutoff)), 0.0)
  n, m = columns.shape
  if axis_name is None:
    basis = columns @ (vecs * inv_sqrt)
    gram, captured = basis.T @ basis, jnp.sum(basis * basis)
  else:  # each device its rows of B; B^T B and its trace summed over them
    rows, index, per = split.my_rows(columns, axis_name)
    mine = rows @ (vecs * inv_sqrt)
    basis = split.assemble(mine, axis_name, index, per, n, dim=0)
    gram, captured = jax.lax.psum((mine.T @ mine, jnp.sum(mine * mine)),
                                  axis_name)
  if diagonal is not None:
    residual = jnp.sum(diagonal) - captured
    missed = max(n - m, 1) if size is None else jnp.maximum(size - m, 1)
    shift = shift + jnp.maximum(residual, 0.0) / missed
  if max_condition is not None:
    shift = shift + largest_eigenvalue(gram) / max_condition
  eye = jnp.eye(m, dtype=w.dtype)
  return basis, cholesky_inverse(shift * eye + gram), shift


@full_precision
def nystrom_apply(basis, core, shift, v):
  """Applies the Woodbury form of :func:`nystrom_factors` to ``v`` ``(n, k)``."""
  # 1/shift on the small factor, not on the result: XLA then fuses the
  # (n, k) subtraction into the update's next elementwise pass instead of
  # writing it out (measured: -18 us of a 0.3 ms step at batch 50).
  inv = 1.0 / shift
  return v * inv - basis @ ((core * inv) @ (basis.T @ v))


@full_precision
def nystrom_quadratic(basis, core, shift, v):
  """``<v, P v>`` for the Woodbury form ``P`` of :func:`nystrom_factors`.

  ``(|v|^2 - <B^T v, core B^T v>) / shift``: from the ``(m, k)`` projections
  that :func:`nystrom_apply` computes too (under jit, XLA computes them once),
  so it costs O(m k) instead of a pass over ``(n, k)``. The difference
  loses digits where ``P v`` is far shorter than ``v / shift``; it is
  clamped at zero.
  """
  projected = basis.T @ v
  return jnp.maximum(jnp.vdot(v, v) - jnp.vdot(projected, core @ projected),
                     0.0) / shift
