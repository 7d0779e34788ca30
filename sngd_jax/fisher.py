"""Local Fisher blocks: the one place that knows each layer kind.

A block turns one layer's activations into its local Fisher statistic, turns
the (averaged) statistic into a preconditioner at refresh time, and applies
the preconditioner to the layer's gradient written as a matrix ``g`` of shape
``(n, d_out)``: one column per output unit, one row per input feature, and a
last row for the bias when the layer has one (``x~ = [x; 1]``).

| kind          | statistic (N = rows of the batch, all leading axes)            | stored block                |
|---------------|-----------------------------------------------------------------|-----------------------------|
| ``linear``    | ``G = E[x~ x~^T]``, shared by every output unit (``E[s x~ x~^T]`` in a recurrent cell: ``SLOPES``) | ``(n, n)`` |
| ``linear`` + Nystrom | ``m`` sampled columns ``E[x~ x~_S^T]`` and ``diag G``    | ``(n, m)``                  |
| ``relu`` ...  | ``G_j = E[nu(h_j) x~ x~^T]`` per output unit ``j``              | ``(d_out, n, n)``           |
| ``softmax``   | ``E[diag(eta) - eta eta^T]`` (x) ``E[x~ x~^T]`` (Kronecker of the two expectations) | ``(d_out, d_out)``, ``(n, n)`` |
| ``affine``    | norm scale/shift: ``E[z_c z_c^T]``, ``z_c = [xhat_c; 1]`` per channel | ``(C, 2, 2)``         |
| ``embedding`` | token frequency ``f_v`` per row; with ``attend``, plus ``E[h h^T]`` | ``(vocab,)``, ``(dim, dim)`` |

Damping is always applied to the layer's block as a whole (for per-unit and
Kronecker kinds, the layer's whole block-diagonal or Kronecker matrix):
``G + (damping + relative_damping * trace(G) / dim + lambda_max(G) /
max_condition) * I`` (``linalg.Damping``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax import linalg, split

Array = jax.Array


def _relu_nu(h):
  # Smooth ReLU (softplus) derivative squared, as in the official code.
  return jax.nn.sigmoid(h) ** 2


def _sigmoid_nu(h):
  s = jax.nn.sigmoid(h)
  return s * (1.0 - s)


def _tanh_nu(h):
  return 1.0 - jnp.tanh(h) ** 2


def _elu_nu(h):
  return jnp.where(h >= 0, 1.0, jnp.exp(2.0 * jnp.minimum(h, 0.0)))


NU = {"relu": _relu_nu, "sigmoid": _sigmoid_nu, "tanh": _tanh_nu, "elu": _elu_nu}
DENSE_KINDS = ("linear", *NU, "softmax")
KINDS = (*DENSE_KINDS, "none")


def rows(x, dtype):
  """Flattens every leading axis: ``(..., d) -> (N, d)`` in ``dtype``."""
  return jnp.reshape(x, (-1, x.shape[-1])).astype(dtype)


def row_weights(entry, dtype, with_slopes=False):
  """The entry's weight per row ``(N, 1)``: its ``WEIGHTS`` (times its
  ``SLOPES``, ``with_slopes``), or None where it has none."""
  keys = (WEIGHTS, SLOPES) if with_slopes else (WEIGHTS,)
  present = [rows(entry[key], dtype) for key in keys if key in entry]
  return functools.reduce(jnp.multiply, present) if present else None


def features(x, n, dtype):
  """``x~ = [x, 1]`` as rows ``(N, n)``; the ones column only if the layer has a bias."""
  x = rows(x, dtype)
  if x.shape[1] == n:
    return x
  # ones_like keeps x's sharding (explicit-sharding meshes require it).
  return jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)


def explicit_spec(x) -> jax.sharding.PartitionSpec | None:
  """How an explicit-sharding mesh (``jax.make_mesh``'s default) splits
  ``x``; ``None`` where it does not (Auto axes, no mesh, replicated)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  explicit = jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ())
  if explicit and sharding is not None and any(sharding.spec):
    return sharding.spec
  return None


def _explicitly_sharded(x) -> bool:
  return explicit_spec(x) is not None


def split_only_leading(x, axes: int):
  """``x`` split by an explicit mesh along its first ``axes`` axes at most.

  A tensor-parallel model's activations and gradients are split along their
  features (``float32[16@batch, 8, 32@model]``): the blocks' statistics,
  reshapes and concatenations need whole rows, so the features are gathered
  while the examples (and a stack's layers) stay split. Elsewhere ``x`` is
  returned as it is.
  """
  spec = explicit_spec(x)
  if spec is None or not any(spec[axes:]):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec(*spec[:axes]))


def _replicated(x):
  """``x`` gathered onto every device where an explicit mesh splits it.

  A scatter into a replicated table needs replicated indices there; elsewhere
  (Auto axes, no mesh) ``x`` is returned as it is.
  """
  return split_only_leading(x, 0)


def batch_mean(spec: str, *operands):
  """``einsum(spec, ...) / N`` over the rows ``n`` (the examples, maybe sharded).

  The statistic is one mean over the whole batch: replicated, also where an
  explicit mesh shards the rows (it must be told so).
  """
  replicated = any(_explicitly_sharded(x) for x in operands)
  out = jnp.einsum(spec, *operands, out_sharding=(
      jax.sharding.PartitionSpec() if replicated else None))
  return out / operands[0].shape[0]


def second_moment(xt):
  return batch_mean("ni,nj->ij", xt, xt)


def augmented_moment(x, n, dtype, slopes=None):
  """``E[x~ x~^T]`` of ``x~ = [x, 1]`` (the ones only if ``n`` > d): ``E[x x^T]``
  bordered by ``E[x]`` and 1, without copying the rows into ``x~`` (that copy
  cost a transformer's statistics step as much as the product).

  With ``slopes`` (``(..., 1)``, one weight per row), ``E[s x~ x~^T]``.
  """
  x = rows(x, dtype)
  if slopes is None:
    moment, corner = second_moment(x), jnp.ones((1, 1), dtype)
  else:
    s = rows(slopes, dtype)
    moment, corner = second_moment(x * jnp.sqrt(s)), batch_mean("ni->i", s)[None]
  if x.shape[1] == n:
    return moment
  mean = batch_mean("ni->i", x if slopes is None else x * s)
  return jnp.block([[moment, mean[:, None]], [mean[None, :], corner]])


def _unit_shift(stats, damping):
  """The damping of a layer's per-unit blocks ``(units, n, n)``.

  It is that of the layer's whole block-diagonal Fisher (its trace over its
  dimension, its largest eigenvalue the largest of any unit's), shared by
  every unit: a unit whose own block is tiny (a nearly dead ReLU) is not
  amplified by a damping that shrinks with it.
  """
  units, n, _ = stats.shape
  trace = jnp.sum(jnp.trace(stats, axis1=-2, axis2=-1))
  return damping.shift(trace, units * n, lambda: jnp.max(
      jax.vmap(linalg.largest_eigenvalue)(stats)))


# jaxlib 0.10 on CPU runs a batched LAPACK call whose cost estimate (batch
# x one matrix's FLOPs) reaches 2e5 as chunks on the intra-op threads that
# also run the program, and waits for them. When every such thread waits
# (two layers' conds at once; the 8 devices of a simulated mesh, one thread
# each) none is left to run a chunk and the step hangs. So on CPU per-unit
# blocks and the layers of a stack are factored in batches whose every
# LAPACK call stays under half that, read from the jaxpr of one unit; under
# an outer vmap (models, seeds) one model at a time, since vmap would
# multiply each batch by the models. Other backends take one batch.
_SPLIT_FLOPS = 1e5
# jaxlib's estimates: Cholesky n^3/3, a triangular solve m^2 k; others
# (eigendecompositions, LU) taken as an eigendecomposition's, about 9 n^3.
_FACTORIZATIONS = ("eigh", "lu", "qr", "householder_product", "svd", "schur",
                   "hessenberg", "tridiagonal", "eig")


def _lapack_flops(jaxpr) -> float:
  """The largest cost estimate of one LAPACK call in ``jaxpr``, nested
  jaxprs included (0 without one)."""
  largest = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    shape: tuple[int, ...] = eqn.invars[0].aval.shape if eqn.invars else ()
    if name == "cholesky":
      largest = max(largest, shape[-1] ** 3 / 3)
    elif name == "triangular_solve":
      rhs = eqn.invars[1].aval.shape
      largest = max(largest, rhs[-2] * rhs[-1] * shape[-1])
    elif name in _FACTORIZATIONS:
      largest = max(largest, 9.0 * max(shape[-2:]) ** 3)
    for inner in jax.extend.core.jaxprs_in_params(eqn.params):
      largest = max(largest, _lapack_flops(getattr(inner, "jaxpr", inner)))
  return largest


def batched(function, blocks, *shared):
  """``jax.vmap(function)(*blocks, *shared)`` over the leading axis of each
  of ``blocks`` (units, a stack's layers; pytrees; ``shared`` go whole to
  every one), on CPU in batches whose LAPACK calls stay under the split."""
  batch = jax.tree.leaves(blocks)[0].shape[0]
  if batch > 1 and jax.default_backend() == "cpu":
    unit = jax.eval_shape(lambda b: jax.tree.map(lambda x: x[0], b), blocks)
    flops = _lapack_flops(jax.make_jaxpr(lambda u, s: function(*u, *s))(
        unit, jax.eval_shape(lambda s: s, shared)).jaxpr)
    if flops:
      batch = max(1, min(batch, int(_SPLIT_FLOPS // flops)))

  @jax.custom_batching.custom_vmap
  def in_batches(blocks, shared):
    # A batch of one is a plain loop: lax.map's batches of one are batched
    # calls of one matrix.
    return jax.lax.map(lambda unit: function(*unit, *shared), blocks,
                       batch_size=None if batch == 1 else batch)

  @in_batches.def_vmap
  def one_model_at_a_time(axis_size, in_batched, blocks, shared):
    def broadcast(x, is_batched):
      return x if is_batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

    args = jax.tree.map(broadcast, (blocks, shared), tuple(in_batched))
    out = jax.lax.map(lambda model: in_batches(*model), args)
    return out, jax.tree.map(lambda _: True, out)

  return in_batches(tuple(blocks), tuple(shared))


def factored(function, *args):
  """``function(*args)``, whose LAPACK calls, under an outer vmap (models,
  seeds), factor one model at a time (``batched`` of one)."""
  return jax.tree.map(lambda x: x[0], batched(
      function, jax.tree.map(lambda x: x[None], args)))


def _unit_inverses(stats, shift, solver):
  """Inverts per-unit blocks ``(units, n, n)``, each shifted, in batches."""
  return batched(lambda g, shift: linalg.inverse(
      g + shift * jnp.eye(g.shape[-1], dtype=g.dtype), solver), (stats,), shift)


# The key of an optional activations entry, a weight per row ``(..., 1)``:
# the ``linear`` block becomes ``E[s x~ x~^T]``. The capture gives a recurrent
# cell's layers the squared slope ``f'(0)^2`` of the gate function their
# outputs go into (a sigmoid's 1/16), the bound of the per-unit blocks'
# ``E[f'(h)^2 x~ x~^T]`` (``capture._cell_rules``).
SLOPES = "slopes"

# The key of an optional activations entry, a weight per position ``(..., 1)``
# (a mask of real tokens: 0 at padding; ``position_mask=`` of the captures):
# every kind's statistic weights its rows by it. Under ``expand`` the weights
# are normalized to mean 1 (the mean over real positions: a masked loss's);
# under ``reduce`` a padded use adds nothing to its example's sum.
WEIGHTS = "weights"

# The key of an activations entry recorded inside a scan (a recurrent cell,
# any module a loop applies at every iteration); its value is ``Scanned()``,
# a static pytree node, so it survives jit and has_aux.
SCANNED = "scanned"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Scanned:
  """Marks an entry whose uses are the iterations of a scan."""


# The key of an activations entry of layers stacked over a scan (a model
# that scans over its blocks: ``nnx.scan``/``nn.scan`` over params with a
# leading layer axis); its value is ``Stacked()``. The entry's arrays lead
# with that layer axis, ``(layers, B, ..., d)``: each layer has its own block.
STACKED = "stacked"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Stacked:
  """Marks an entry whose leading axis is the layers of a stack."""


# The key the captures give every entry they make; its value is
# ``Captured()``. Such an entry is a module of the model: where the params
# have no layer at its path, the layer is frozen (``nnx.Optimizer(wrt=...)``),
# not misspelt, and its entry goes unused; a hand-built entry there raises.
CAPTURED = "captured"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Captured:
  """Marks an entry made by ``nnx_capture``/``linen_capture``."""


# An entry's keys whose values are static markers, not records.
MARKERS = (SCANNED, STACKED, CAPTURED)


def _position_axes(inputs) -> tuple[int, ...]:
  """The sizes of the inputs' position axes: every axis but the first (the
  examples) and the features (token ids have none)."""
  shape = np.shape(inputs)
  ids = jnp.issubdtype(jnp.result_type(inputs), jnp.integer)
  return shape[1:] if ids else shape[1:-1]


def uses_per_example(inputs) -> int:
  """How many times each example used the layer: its positions, time steps, calls.

  The product of the inputs' position axes; a convolution's lazy inputs count
  their output positions.
  """
  if hasattr(inputs, "positions"):
    return inputs.positions
  return math.prod(_position_axes(inputs))


def auto_sharing(entry: dict) -> str:
  """``weight_sharing="auto"``'s mode for a layer's entry: ``"expand"`` or ``"reduce"``.

  A sequence's uses expand: a layer recorded inside a scan (a recurrent
  cell's steps) or used along one position axis (tokens: inputs ``(B, L,
  d)``, ids ``(B, L)``), since a sequence model's loss is most often one per
  position (a language model's). An image's uses reduce: a convolution, or a
  layer over two or more position axes (a BatchNorm over ``H W``), since an
  image model's loss is one per example. A layer used once per example is
  the same either way.
  """
  if SCANNED in entry:
    return "expand"
  inputs = entry.get("inputs", entry.get("attend"))
  if inputs is None or hasattr(inputs, "positions"):  # a convolution's
    return "reduce"
  return "expand" if len(_position_axes(inputs)) == 1 else "reduce"


def _mixed(x: jax.Array) -> jax.Array:
  """murmur3's finalizer: each uint32 to a well-mixed uint32."""
  for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    x = (x ^ (x >> shift)) * np.uint32(factor)
  return x ^ (x >> 16)


def position_seed(step, draw: int) -> jax.Array:
  """The seed of a step's ``draw``-th choice of positions: every device and
  every model draws the same ones."""
  return _mixed(jnp.asarray(step).astype(jnp.uint32) * np.uint32(0x9E3779B9)
                + np.uint32(draw))


def picked_positions(seed, positions: int, limit: int) -> jax.Array:
  """``limit`` of ``range(positions)``, sorted, drawn uniformly without
  replacement: the positions of the ``limit`` largest hashes.

  A hash and a sort (not ``jax.random.choice``: its shuffle's loops made up
  a fifth of a ResNet-18 update's kernels, and compiled as such).
  """
  hashes = _mixed(jnp.arange(positions, dtype=jnp.uint32) ^ _mixed(seed))
  # Unsigned: indexing with them compiles no wrap-around of negatives.
  return jnp.sort(jax.lax.top_k(hashes, limit)[1]).astype(jnp.uint32)


def sampled_positions(entry: dict, limit: int, seed) -> dict:
  """The entry at ``limit`` positions per example, drawn with ``seed``
  (``position_seed``), where it has more.

  Every record with a positions axis (inputs ``(B, ..., d)``, token ids
  ``(B, ...)``, a convolution's patches) keeps the same ``limit`` positions
  of each example, drawn uniformly without replacement: the mean over them
  is an unbiased estimate of the mean over all positions, at ``limit / P``
  of the cost. Records with the same number of positions (a layer's inputs
  and outputs) keep the same ones.
  """

  def picked(positions):
    return picked_positions(seed, positions, limit)

  def sample(x):
    if hasattr(x, "at_positions"):  # a convolution's: patches at those only
      patches = x.at_positions(picked(x.positions))
      if patches is not None:
        return patches
    x = materialized(x)
    ids = jnp.issubdtype(x.dtype, jnp.integer)
    tail = () if ids else x.shape[-1:]
    flat = jnp.reshape(x, x.shape[:1] + (-1,) + tail)
    if flat.shape[1] <= limit:
      return x
    return flat.at[:, picked(flat.shape[1])].get(mode="promise_in_bounds")

  return {name: sample(value) if name not in MARKERS
          and uses_per_example(value) > limit else value
          for name, value in entry.items()}


def materialized(x):
  """Inputs given lazily (a convolution's ``ConvInputs``, a norm's
  ``NormInputs``) are built here only."""
  return x.materialize() if hasattr(x, "materialize") else x


class _Block:
  """What every block shares: its statistic's scale under weight sharing.

  A block reads an activations entry: ``entry["inputs"]`` (a convolution's
  and a norm's lazily, through ``materialized``) and, for the kinds that need them,
  ``entry["outputs"]``.
  """

  n: int  # the block's size (each kind's field; an embedding has none)

  def scaled(self, stats, entry):
    """The statistic of a layer used ``T`` times per example (its entry's positions).

    The gradient of a per-example loss sums over the uses, so the per-example
    Fisher sums over them too: ``T`` times the mean over uses.
    """
    uses = uses_per_example(entry["inputs"])
    return jax.tree.map(lambda s: s * uses, stats)

  def refresh_split(self, stacked, damping, solver, axis):
    """The refresh of ``k`` such blocks (stacked on a leading axis) with the
    devices of the bound ``axis`` sharing the work (``sngd_jax.split``)."""
    blocks = jax.tree.leaves(stacked)[0].shape[0]
    fresh = [self.refresh_part(jax.tree.map(lambda x, i=i: x[i], stacked),
                               damping, solver, axis)
             for i in range(blocks)]
    return split.stack(fresh)

  def refresh_part(self, stats, damping, solver, axis):
    """One block's refresh, divided among ``axis``'s devices where it pays.

    Blocks whose refresh is cheap (softmax, embeddings: eigendecompositions of
    the small factors) compute it whole on every device.
    """
    del axis
    return self.refresh(stats, damping, solver)

  def padding_family(self) -> tuple | None:
    """Blocks of one family and several sizes are refreshed as one batch,
    padded with zeros to the largest (``pad``, ``own``, ``cut``); ``None``:
    this kind is refreshed only with blocks of its own size."""
    return None

  def refresh_cost(self) -> float:
    """About the FLOPs of one block's refresh (0: not counted)."""
    return 0.0

  def apply(self, precond, g, entry):
    del entry
    return self.apply_matrix(precond, g)

  def quadratic(self, precond, g, direction):
    """``<g, P g>`` (``direction = P g``): the step's squared length in the block's metric."""
    del precond
    return jnp.vdot(direction, g)

  def metric(self, precond, m, entry):
    """``<m, P^{-1} m>``: ``m``'s squared length in the metric ``P`` preconditions with.

    After a refresh changes ``P``, the momentum clip measures its buffer anew
    with it.
    """
    del entry
    return self.metric_matrix(precond, m)


@dataclasses.dataclass(frozen=True)
class Linear(_Block):
  """One block ``E[x~ x~^T]`` shared by all output units."""

  n: int

  def init(self, dtype):
    return jnp.eye(self.n, dtype=dtype)

  def statistic(self, entry, dtype):
    return augmented_moment(materialized(entry["inputs"]), self.n, dtype,
                            row_weights(entry, dtype, with_slopes=True))

  def refresh(self, stats, damping, solver, own=None):
    """The damped inverse; ``own`` (``self.own()`` of a smaller block whose
    ``stats`` come padded to this size) damps the block as its own size."""
    size = None if own is None else own["size"]
    return linalg.inverse(linalg.damped(stats, damping, size), solver)

  def padding_family(self):
    return ("linear",)

  def refresh_cost(self):
    return 3.0 * self.n ** 3  # a Cholesky and two triangular solves

  def own(self) -> dict:
    return {"size": np.int32(self.n)}

  def pad(self, tree, to: Linear):
    """Statistics or preconditioners ``(..., n, n)`` padded with zeros to ``to``'s size."""
    extra = to.n - self.n
    return jnp.pad(tree, [(0, 0)] * (tree.ndim - 2) + [(0, extra)] * 2)

  def cut(self, tree):
    """``pad``'s inverse."""
    return tree[..., :self.n, :self.n]

  def refresh_split(self, stacked, damping, solver, axis):
    """``k`` blocks ``(k, n, n)`` on ``D`` devices: with ``k >= D`` each
    device inverts its ``ceil(k / D)`` whole blocks; else each block gets
    ``D // k`` devices, which solve for its columns, a share each (each of
    them factors the block: the Cholesky or eigendecomposition)."""
    blocks, devices = stacked.shape[0], jax.lax.axis_size(axis)
    damped = jax.vmap(lambda g: linalg.damped(g, damping))(stacked)
    if blocks >= devices:
      return split.by_rows(lambda mine: batched(
          lambda a: linalg.inverse(a, solver), (mine,)), damped, axis,
                           fill=jnp.eye(self.n, dtype=stacked.dtype))
    sharing = devices // blocks  # devices per block; the rest idle
    device = jax.lax.axis_index(axis)
    which, share = jnp.minimum(device // sharing, blocks - 1), device % sharing
    per = -(-self.n // sharing)
    columns = share * per + jnp.arange(per)
    rhs = (jnp.arange(self.n)[:, None] == columns[None, :]).astype(stacked.dtype)
    mine = factored(lambda a, rhs: linalg.inverse(a, solver, rhs),
                    damped[which], rhs)
    mine = jnp.where(device < sharing * blocks, mine, 0.0)  # idle: nothing
    whole = jax.lax.dynamic_update_slice(
        jnp.zeros((blocks, self.n, per * sharing), stacked.dtype),
        mine[None], (which, 0, share * per))
    return jax.lax.psum(whole, axis)[:, :, :self.n]

  def apply_matrix(self, precond, g):
    return precond @ g

  def metric_matrix(self, precond, m):
    return linalg.inverse_metric(precond, m)


@dataclasses.dataclass(frozen=True)
class NystromLinear(_Block):
  """The ``linear`` block approximated from ``m`` fixed sampled columns.

  The columns are a uniformly random subset of the input features, drawn once
  from the block's size (so every run, every host and every layer of that
  width draws the same ones, and alike layers stack); the bias column is
  always among them. What the columns miss is damped by its
  mean eigenvalue (``linalg.nystrom_factors``' spectral shift). Memory and
  statistics cost O(N n m).
  """

  n: int
  columns: tuple[int, ...]

  @classmethod
  def for_width(cls, n: int, rank: int, bias: bool):
    rng = np.random.default_rng(zlib.crc32(f"{n}/{rank}/{bias}".encode()))
    if bias:
      picked = rng.choice(n - 1, size=rank - 1, replace=False).tolist() + [n - 1]
    else:
      picked = rng.choice(n, size=rank, replace=False).tolist()
    return cls(n=n, columns=tuple(sorted(picked)))

  def init(self, dtype):
    eye = jnp.eye(self.n, dtype=dtype)
    return {"columns": eye[:, np.array(self.columns)],
            "diagonal": jnp.ones((self.n,), dtype)}

  def statistic(self, entry, dtype):
    xt = features(materialized(entry["inputs"]), self.n, dtype)
    weights = row_weights(entry, dtype, with_slopes=True)
    if weights is not None:
      xt = xt * jnp.sqrt(weights)
    return {"columns": batch_mean("ni,nj->ij", xt, xt[:, np.array(self.columns)]),
            "diagonal": jnp.mean(xt * xt, axis=0)}

  def refresh(self, stats, damping, solver, axis=None, own=None):
    del solver  # Woodbury needs one m x m Cholesky, whatever the solver.
    size, columns = (None, np.array(self.columns)) if own is None else (
        own["size"], own["columns"])
    # The cap is taken from the approximation's own spectrum, after it.
    shift = damping.uncapped().shift(jnp.sum(stats["diagonal"]),
                                     self.n if size is None else size)
    basis, core, shift = linalg.nystrom_factors(
        stats["columns"], columns, shift, stats["diagonal"], axis,
        damping.max_condition, size)
    return {"basis": basis, "core": core, "shift": shift}

  def padding_family(self):
    return ("nystrom", len(self.columns))

  def refresh_cost(self):
    rank = len(self.columns)
    return 6.0 * self.n * rank ** 2 + 10.0 * rank ** 3

  def own(self) -> dict:
    return {"size": np.int32(self.n),
            "columns": np.array(self.columns, np.int32)}

  # The arrays with a row per input feature: the statistics' columns and
  # diagonal, the preconditioner's basis; the axis of those rows.
  _ROWS = {"columns": -2, "diagonal": -1, "basis": -2}

  def pad(self, tree, to: NystromLinear):
    """Statistics or preconditioners padded with zero rows to ``to``'s size."""
    def padded(key, x):
      if key not in self._ROWS:
        return x
      widths = [(0, 0)] * x.ndim
      widths[self._ROWS[key]] = (0, to.n - self.n)
      return jnp.pad(x, widths)
    return {key: padded(key, x) for key, x in tree.items()}

  def cut(self, tree):
    """``pad``'s inverse."""
    return {key: jax.lax.slice_in_dim(x, 0, self.n, axis=self._ROWS[key] % x.ndim)
            if key in self._ROWS else x for key, x in tree.items()}

  def refresh_part(self, stats, damping, solver, axis):
    # Each device computes its rows of the basis.
    return self.refresh(stats, damping, solver, axis)

  def apply_matrix(self, precond, g):
    return linalg.nystrom_apply(
        precond["basis"], precond["core"], precond["shift"], g)

  def quadratic(self, precond, g, direction):
    # Not vdot(direction, g): that pass over (n, d_out) costs as much as a
    # matmul at small batches (measured: 35 us of a 230 us Adam step).
    del direction
    return linalg.nystrom_quadratic(
        precond["basis"], precond["core"], precond["shift"], g)

  def metric_matrix(self, precond, m):
    # P^{-1} = shift I + B B^T exactly (the Woodbury form's own matrix).
    projected = precond["basis"].T @ m
    return precond["shift"] * jnp.vdot(m, m) + jnp.vdot(projected, projected)


@dataclasses.dataclass(frozen=True)
class _UnitBlocks(_Block):
  """A ``(n, n)`` block per output unit, inverted in batches (``batched``)."""

  n: int
  d_out: int

  def init(self, dtype):
    return jnp.broadcast_to(
        jnp.eye(self.n, dtype=dtype), (self.d_out, self.n, self.n))

  def refresh(self, stats, damping, solver):
    return _unit_inverses(stats, _unit_shift(stats, damping), solver)

  def refresh_part(self, stats, damping, solver, axis):
    # Each device inverts its units' blocks (past the last unit: identities).
    shift = _unit_shift(stats, damping)
    return split.by_rows(lambda mine: _unit_inverses(mine, shift, solver),
                         stats, axis, fill=jnp.eye(self.n, dtype=stats.dtype))

  def apply_matrix(self, precond, g):
    # update[:, j] = P_j @ g[:, j]
    return jnp.einsum("jik,kj->ij", precond, g)

  def metric_matrix(self, precond, m):
    return jnp.sum(batched(lambda p, column: linalg.inverse_metric(
        p, column[:, None]), (precond, m.T)))


@dataclasses.dataclass(frozen=True)
class PerUnit(_UnitBlocks):
  """One block per output unit, ``E[nu(h_j) x~ x~^T]``."""

  nu: Callable[[Array], Array] = _relu_nu

  def statistic(self, entry, dtype):
    xt = features(materialized(entry["inputs"]), self.n, dtype)
    weights = self.nu(rows(entry["outputs"], dtype))
    if WEIGHTS in entry:
      weights = weights * row_weights(entry, dtype)
    return batch_mean("nj,ni,nk->jik", weights, xt, xt)


@dataclasses.dataclass(frozen=True)
class Softmax(_Block):
  """Output layer: Kronecker product of ``E[diag(eta) - eta eta^T]`` and ``E[x~ x~^T]``.

  The damped Kronecker product is inverted exactly from the eigenpairs of the
  two factors, whatever the solver.
  """

  n: int
  d_out: int

  def scaled(self, stats, entry):
    # Scaling one factor scales the Kronecker product.
    return {**stats, "input": stats["input"] * uses_per_example(entry["inputs"])}

  def init(self, dtype):
    return {"output": jnp.eye(self.d_out, dtype=dtype),
            "input": jnp.eye(self.n, dtype=dtype)}

  def statistic(self, entry, dtype):
    eta = jax.nn.softmax(rows(entry["outputs"], dtype), axis=-1)
    weights = row_weights(entry, dtype)
    root = 1.0 if weights is None else jnp.sqrt(weights)
    output = (jnp.diag(batch_mean("nj->j", root * root * eta))
              - second_moment(root * eta))
    return {"output": output, "input": augmented_moment(
        materialized(entry["inputs"]), self.n, dtype, weights)}

  def refresh(self, stats, damping, solver):
    del solver
    out_vals, out_vecs = jnp.linalg.eigh(stats["output"])
    in_vals, in_vecs = jnp.linalg.eigh(stats["input"])
    trace = jnp.sum(out_vals) * jnp.sum(in_vals)
    shift = damping.shift(trace, self.n * self.d_out,
                          lambda: jnp.max(out_vals) * jnp.max(in_vals))
    return {"output": out_vecs, "input": in_vecs,
            "scale": 1.0 / (jnp.outer(in_vals, out_vals) + shift)}

  def apply_matrix(self, precond, g):
    rotated = precond["input"].T @ g @ precond["output"]
    return precond["input"] @ (rotated * precond["scale"]) @ precond["output"].T

  def metric_matrix(self, precond, m):
    rotated = precond["input"].T @ m @ precond["output"]
    return jnp.sum(jnp.square(rotated) / precond["scale"])


@dataclasses.dataclass(frozen=True)
class Affine(_UnitBlocks):
  """Scale/shift of a normalization layer: a ``(n, n)`` block per channel.

  ``z_c = [xhat_c]`` plus a ``1`` for the shift (n is 1 or 2); ``xhat`` is the
  normalized input that the scale multiplies.
  """

  has_scale: bool = True

  def statistic(self, entry, dtype):
    # Per channel E[z z^T] from E[xhat^2] and E[xhat] (a batched product of
    # stacked (N, C, n) rows took a transformer's LayerNorm 6 ms on a CPU).
    xhat = rows(materialized(entry["inputs"]), dtype)
    weights = row_weights(entry, dtype)
    ones = jnp.ones(xhat.shape[1:], dtype)
    weighted = xhat
    if weights is not None:
      ones, weighted = ones * batch_mean("ni->i", weights), xhat * weights
    if not self.has_scale:
      return ones[:, None, None]
    square = batch_mean("nc,nc->c", weighted, xhat)
    if self.n == 1:
      return square[:, None, None]
    mean = batch_mean("nc->c", weighted)
    return jnp.stack([jnp.stack([square, mean], -1),
                      jnp.stack([mean, ones], -1)], -2)


@dataclasses.dataclass(frozen=True)
class Embedding(_Block):
  """An embedding table ``(vocab, dim)``, used for lookups and as a tied output layer.

  A lookup of token ``v`` is a dense layer with a one-hot input, so row ``v``
  gets ``f_v I`` (``f_v``: its frequency). ``Embed.attend(h)``, the logits
  ``h E^T``, is a dense layer whose output units are the rows, so every row
  gets ``C = E[h h^T]``. A parameter used twice gets the sum of both uses'
  local Fisher blocks (the cross terms are dropped, as between layers): row
  ``v``'s block is ``f_v I + C``, inverted for every row at once from the
  eigenpairs of ``C``. Without ``attend`` (``C = 0``) the block is diagonal.
  """

  vocab: int
  dim: int

  def init(self, dtype):
    return {"counts": jnp.ones((self.vocab,), dtype),
            "hidden": jnp.zeros((self.dim, self.dim), dtype)}

  def statistic(self, entry, dtype):
    counts = jnp.zeros((self.vocab,), dtype)
    weights = row_weights(entry, dtype)
    if "inputs" in entry:
      ids = jnp.reshape(_replicated(entry["inputs"]), (-1,))
      each = jnp.asarray(1.0 / ids.shape[0], dtype)
      if weights is not None:
        each = each * _replicated(weights)[:, 0]
      counts = counts.at[ids].add(each)
    hidden = jnp.zeros((self.dim, self.dim), dtype)
    if "attend" in entry:
      attend = rows(entry["attend"], dtype)
      if weights is not None:
        attend = attend * jnp.sqrt(weights)
      hidden = second_moment(attend)
    return {"counts": counts, "hidden": hidden}

  def scaled(self, stats, entry):
    scale = {key: uses_per_example(entry[name]) if name in entry else 1
             for key, name in (("counts", "inputs"), ("hidden", "attend"))}
    return {key: stats[key] * scale[key] for key in stats}

  def refresh(self, stats, damping, solver):
    del solver  # One eigendecomposition serves every row's block.
    values, vectors = jnp.linalg.eigh(stats["hidden"])
    values = jnp.maximum(values, 0.0)
    trace = self.dim * jnp.sum(stats["counts"]) + self.vocab * jnp.sum(values)
    # Row v's block f_v I + C: the largest eigenvalue is max f + max eig C.
    shift = damping.shift(trace, self.vocab * self.dim, lambda: (
        jnp.max(stats["counts"]) + jnp.max(values)))
    return {"counts": stats["counts"] + shift, "values": values,
            "vectors": vectors}

  def _lookups_only(self, entry):
    """Which rows a lookup-only table preconditions: ``(vocab, 1)``.

    Rows no captured lookup used in this batch whose gradient is not zero
    come from a use the capture did not see (the table multiplied by hand,
    say): they keep the plain gradient, never 1/damping times it.
    """
    if "inputs" not in entry:
      return jnp.ones((self.vocab, 1), bool)
    ids = jnp.reshape(_replicated(entry["inputs"]), (-1,))
    return jnp.zeros((self.vocab,), bool).at[ids].set(True)[:, None]

  def apply(self, precond, g, entry):
    counts = precond["counts"][:, None]
    if "attend" not in entry:
      return jnp.where(self._lookups_only(entry), g / counts, g)
    rotated = g @ precond["vectors"]
    return (rotated / (counts + precond["values"])) @ precond["vectors"].T

  def metric(self, precond, m, entry):
    counts = precond["counts"][:, None]
    if "attend" not in entry:
      return jnp.sum(jnp.where(self._lookups_only(entry), counts, 1.0)
                     * jnp.square(m))
    rotated = m @ precond["vectors"]
    return jnp.sum(jnp.square(rotated) * (counts + precond["values"]))


Block = Any  # One of the dataclasses above.
