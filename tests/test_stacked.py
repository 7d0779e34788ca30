"""Models that scan over stacked layers: each layer of a stack gets its own
block, and the stacked model trains exactly as the same model unrolled."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import sngd_jax
from tests.helpers import blobs, cross_entropy, loss_and_acts, mlp_params

D, LAYERS, STEPS = 8, 3, 4
# Statistics and refreshes at every step, and every position (sampled
# positions are drawn per layer), so each step exercises every stage.
# The KL clip sums the step's length in float32, in an order that depends on
# how the layers stack: its scale, and so the params, agree to ~1e-7; the
# statistics, which it does not touch, to float64's rounding.
def assert_params_close(stacked, unrolled):
  np.testing.assert_allclose(stacked, unrolled, rtol=1e-6,
                             atol=1e-6 * np.max(np.abs(unrolled)))
OPTIONS = dict(momentum=0.9, stats_every=1, inverse_every=2,
               stats_positions=None)


def tokens(step):
  key = jax.random.fold_in(jax.random.PRNGKey(7), step)
  x = jax.random.normal(key, (4, 5, D), jnp.float64)
  labels = jnp.argmax(jnp.sum(x, axis=1)[:, :3], axis=-1)
  return x, labels


class Block(nnx.Module):
  """A transformer block: norm, attention (biased q/k/v/out), biased and
  bias-free dense layers."""

  def __init__(self, rngs, bias=True):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64, rngs=rngs)
    self.norm = nnx.LayerNorm(D, use_bias=bias, **f64)
    self.attn = nnx.MultiHeadAttention(2, D, decode=False, use_bias=bias,
                                       **f64)
    self.up = nnx.Linear(D, 12, use_bias=bias, **f64)
    self.down = nnx.Linear(12, D, use_bias=False, **f64)

  def __call__(self, x):
    x = x + self.attn(self.norm(x))
    return x + self.down(jnp.tanh(self.up(x)))


class Scanned(nnx.Module):

  def __init__(self, rngs, bias=True):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def blocks(rngs):
      return Block(rngs, bias)

    self.blocks = blocks(rngs)
    self.head = nnx.Linear(D, 3, param_dtype=jnp.float64, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(x, block):
      return block(x)

    return self.head(jnp.mean(through(x, self.blocks), axis=1))


class Unrolled(nnx.Module):

  def __init__(self, scanned: Scanned):
    stacked = nnx.state(scanned.blocks)
    self.blocks = nnx.List([Block(nnx.Rngs(0)) for _ in range(LAYERS)])
    for i, block in enumerate(self.blocks):
      nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stacked))
    self.head = nnx.clone(scanned.head)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=1))


def nnx_trained(model, steps=STEPS, **options):
  """The model after ``steps`` jitted SNGD steps, and the optimizer."""
  optimizer = nnx.Optimizer(model, sngd_jax.sngd(0.3, **OPTIONS, **options),
                            wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, labels):
    def loss_fn(model):
      logits, acts = sngd_jax.nnx_capture(model, x)
      return cross_entropy(logits, labels), acts

    (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activations=acts)

  for i in range(steps):
    step(model, optimizer, *tokens(i))
  return model, optimizer


def test_nnx_scanned_blocks_train_as_the_unrolled_model():
  scanned = Scanned(nnx.Rngs(0))
  unrolled = Unrolled(scanned)
  before = nnx.state(scanned, nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no layer gets the plain gradient
    scanned, optimizer = nnx_trained(scanned)
  unrolled, unrolled_optimizer = nnx_trained(unrolled)

  stacked = nnx.state(scanned.blocks, nnx.Param)
  for i, block in enumerate(unrolled.blocks):
    jax.tree.map(lambda s, u, i=i: assert_params_close(s[i], u), stacked,
                 nnx.state(block, nnx.Param))
  assert_params_close(scanned.head.kernel[...], unrolled.head.kernel[...])
  # Each layer of the stack has its own block, equal to the unrolled layer's.
  state = optimizer.opt_state[0]
  unrolled_state = unrolled_optimizer.opt_state[0]
  for name in ("attn/query", "up", "down", "norm"):
    stats = sngd_jax.layer_slice(state.stats, f"blocks/{name}")[...]
    assert stats.shape[0] == LAYERS
    for i in range(LAYERS):
      np.testing.assert_allclose(
          stats[i], sngd_jax.layer_slice(unrolled_state.stats,
                                         f"blocks/{i}/{name}")[...],
          rtol=1e-6, atol=1e-12)
    assert not np.allclose(stats[0], stats[1])  # not one block shared
  # Preconditioned: the step is not the plain gradient's.
  assert state.clipped[...] >= 0 and int(state.inverse_faults[...]) == 0
  moved = jax.tree.map(lambda a, b: a - b, nnx.state(scanned, nnx.Param), before)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(moved))


def test_stacked_preconditioner_is_not_the_identity():
  scanned, optimizer = nnx_trained(Scanned(nnx.Rngs(1)), steps=1)
  precond = sngd_jax.layer_slice(optimizer.opt_state[0].preconditioners,
                                 "blocks/up")[...]
  assert precond.shape == (LAYERS, D + 1, D + 1)
  for i in range(LAYERS):
    assert not np.allclose(precond[i], np.eye(D + 1), atol=1e-3)


def test_a_bias_free_stack_needs_naming_and_then_trains():
  with pytest.raises(ValueError, match=r"params of 'blocks/.*stacked=\{'blocks/"):
    nnx_trained(Scanned(nnx.Rngs(0), bias=False), steps=1)
  model, optimizer = nnx_trained(Scanned(nnx.Rngs(0), bias=False), steps=2,
                                 stacked={"blocks/*": True},
                                 output_axes={"*/query": 2, "*/key": 2,
                                              "*/value": 2})
  stats = optimizer.opt_state[0].stats
  assert sngd_jax.layer_slice(stats, "blocks/attn/key")[...].shape == (
      LAYERS, D, D)
  assert sngd_jax.layer_slice(stats, "blocks/norm")[...].shape == (
      LAYERS, D, 1, 1)


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    h = nn.Dense(12, **f64)(nn.LayerNorm(**f64)(x))
    return x + nn.Dense(D, use_bias=False, **f64)(jnp.tanh(h)), None


class LinenModel(nn.Module):
  scan: bool

  @nn.compact
  def __call__(self, x):
    if self.scan:
      x, _ = nn.scan(LinenBlock, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)()(x, None)
    else:
      for i in range(LAYERS):
        x, _ = LinenBlock(name=f"block{i}")(x, None)
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.mean(x, axis=1))


def linen_trained(scan, params):
  model = LinenModel(scan)
  tx = sngd_jax.sngd(0.3, **OPTIONS)

  @jax.jit
  def step(params, state, x, labels):
    def loss_fn(params):
      logits, acts = sngd_jax.linen_capture(model, {"params": params}, x)
      return cross_entropy(logits, labels), acts

    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(STEPS):
    params, state = step(params, state, *tokens(i))
  return params, state


def test_linen_scan_over_layers_trains_as_the_unrolled_model():
  x, _ = tokens(0)
  params = LinenModel(True).init(jax.random.PRNGKey(0), x)["params"]
  stack = params["ScanLinenBlock_0"]
  unrolled = {"Dense_0": params["Dense_0"], **{
      f"block{i}": jax.tree.map(lambda a, i=i: a[i], stack)
      for i in range(LAYERS)}}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    scanned, state = linen_trained(True, params)
  unrolled, _ = linen_trained(False, unrolled)
  for i in range(LAYERS):
    jax.tree.map(lambda s, u, i=i: assert_params_close(s[i], u),
                 scanned["ScanLinenBlock_0"], unrolled[f"block{i}"])
  assert sngd_jax.layer_slice(state[0].stats, "ScanLinenBlock_0/Dense_0"
                              ).shape == (LAYERS, 9, 9)


# jaxlib 0.10.2 on CPU runs a batched LAPACK call whose estimate (batch x one
# matrix's FLOPs: Cholesky n^3/3, triangular solve m^2 k, eigh 5 n^3, LU
# n^3; read from its _lapack.so) reaches 2e5 on the threads that run the
# program, and waits: two at once, or 8 simulated devices, hung steps (a
# 12-block scanned GPT's Nystrom blocks; the momentum remeasure's solves of
# a tensor-parallel transformer on a loaded 2-core machine).
JAXLIB_SPLIT = 2e5


def _lapack_calls(jaxpr):
  """``(primitive, batch, one matrix's estimate)`` of every LAPACK call in a
  jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    shape = eqn.invars[0].aval.shape if eqn.invars else ()
    batch = int(np.prod(shape[:-2]))
    if name == "cholesky":
      yield name, batch, shape[-1] ** 3 / 3
    elif name == "triangular_solve":
      rows, columns = eqn.invars[1].aval.shape[-2:]
      yield name, batch, rows * columns * shape[-1]
    elif name == "eigh":
      yield name, batch, 5 * shape[-1] ** 3
    elif name == "lu":
      yield name, batch, shape[-1] ** 3
    for inner in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _lapack_calls(getattr(inner, "jaxpr", inner))


def transformer_update():
  """The update of the tensor-parallel check's transformer (one device,
  momentum: refreshes, output roots and the momentum's remeasure)."""
  from tests.tensor_parallel_check import CONTEXT, VOCAB, model_and_optimizer
  model, optimizer = model_and_optimizer(sharded=False)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(1), (16, CONTEXT + 1), 0, VOCAB)

  def loss(params):
    logits, acts = sngd_jax.nnx_capture(nnx.merge(graphdef, params, rest),
                                        tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean(), acts

  (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
  tx = optimizer.tx
  return jax.make_jaxpr(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
      grads, tx.init(params), params, acts)


def mlp_update(sizes, **options):
  """The jaxpr of an MLP's update with momentum."""
  params = mlp_params(jax.random.PRNGKey(0), sizes, jnp.float32)
  x, labels = blobs(jax.random.PRNGKey(1), 64, sizes[0], sizes[-1], jnp.float32)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  tx = sngd_jax.sngd(0.1, momentum=0.9, **options)
  return jax.make_jaxpr(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
      grads, tx.init(params), params, acts)


def vmapped_update():
  """Eight models under ``jax.vmap`` (``vmap_axis_name``), blocks of 33 and
  129 rows, per-unit and softmax: vmap would multiply each call's batch by
  the models."""
  tx = sngd_jax.sngd(0.1, momentum=0.9, vmap_axis_name="seeds", layer_fisher={
      "layer1": "relu", "layer2": "softmax", "*": "linear"})

  def update(key):
    params = mlp_params(key, [32, 128, 64, 10], jnp.float32)
    x, labels = blobs(key, 64, 32, 10, jnp.float32)
    (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels)
    return tx.update(grads, tx.init(params), params, activations=acts)

  return jax.make_jaxpr(jax.vmap(update, axis_name="seeds"))(
      jax.random.split(jax.random.PRNGKey(0), 8))


def stack_refresh(make, solver, refresh_axis=None):
  """The refresh of 12 alike blocks stacked; with ``refresh_axis`` divided
  among the devices of a one-device mesh."""
  block = make()
  stats = jax.tree.map(lambda x: jnp.broadcast_to(x, (12,) + x.shape),
                       block.init(jnp.float32))
  damping = sngd_jax.linalg.Damping(1e-3, 1e-3, None)
  with jax.set_mesh(jax.make_mesh((1,), ("data",))):
    return jax.make_jaxpr(lambda s: sngd_jax.transform.refresh_group(
        block, s, damping, solver, refresh_axis))(stats)


@pytest.mark.parametrize("program", [
    transformer_update,
    # A per-unit (relu) layer of 64 blocks of 33.
    functools.partial(mlp_update, [32, 64, 10], layer_fisher="relu"),
    # Exact blocks of 27, 301 and 21 rows padded to 301 (1000-output roots).
    functools.partial(mlp_update, [26, 300, 20, 1000], nystrom=None),
    vmapped_update,
    *[functools.partial(stack_refresh, make, solver)
      for make in (lambda: sngd_jax.fisher.Linear(40),
                   lambda: sngd_jax.fisher.NystromLinear.for_width(1025, 32, True),
                   lambda: sngd_jax.fisher.Softmax(33, 10))
      for solver in sngd_jax.linalg.SOLVERS],
    *[functools.partial(stack_refresh, lambda: sngd_jax.fisher.Linear(40),
                        solver, "data") for solver in sngd_jax.linalg.SOLVERS]],
    ids=["transformer", "per-unit", "padded", "vmap", *[f"{kind}-{solver}" for kind in
         ("linear", "nystrom", "softmax", "linear-divided")
         for solver in sngd_jax.linalg.SOLVERS]])
def test_every_batched_lapack_call_stays_under_jaxlibs_split_on_cpu(program):
  calls = list(_lapack_calls(program().jaxpr))
  assert calls
  batched = [(name, batch, cost) for name, batch, cost in calls if batch > 1]
  assert all(batch * cost < JAXLIB_SPLIT for _, batch, cost in batched), batched


def refresh_groups_seen(monkeypatch):
  """The block sizes of each refresh group of the updates traced after this
  call (a spy on ``transform._refresh_groups``)."""
  seen = []
  plan = sngd_jax.transform._refresh_groups

  def spy(*args):
    groups = plan(*args)
    seen.append([sorted({stack.block.n for stack in group}) for group in groups])
    return groups

  monkeypatch.setattr(sngd_jax.transform, "_refresh_groups", spy)
  return seen


@pytest.mark.parametrize("nystrom,solver", [
    (None, "cholesky"), (None, "eigh"), (None, "denman_beavers"),
    (sngd_jax.Nystrom(rank=4, min_dim=8), "cholesky")])
def test_blocks_padded_to_their_familys_largest_refresh_as_their_own_size(
    monkeypatch, nystrom, solver):
  """Exact blocks of 7, 10, 13 and 21 rows (or Nystrom blocks of 10, 13 and
  21 of rank 4) refreshed as one batch padded with zeros to the largest give
  each its own preconditioner: its own damping, trace and largest
  eigenvalue, its own Nystrom columns and spectral shift."""
  params = mlp_params(jax.random.PRNGKey(0), [12, 20, 6, 9, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=64, d=12)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  seen = refresh_groups_seen(monkeypatch)
  results = []
  for share in (0.0, np.inf):  # none padded; all padded
    monkeypatch.setattr(sngd_jax.transform, "_PADDING_SHARE", share)
    tx = sngd_jax.sngd(0.1, momentum=0.9, nystrom=nystrom, solver=solver,
                       stats_every=1, inverse_every=1)
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grads, state, params, activations=acts)
    results.append((updates, state[0].preconditioners))
  separate, padded = seen[0], seen[-1]
  assert len(padded) < len(separate) and max(map(len, padded)) >= 3, seen
  rtol = 1e-6 if solver == "denman_beavers" else 1e-10
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol,
                                 atol=rtol), results[0], results[1])


def test_padding_is_chosen_where_it_adds_little_to_the_refresh(monkeypatch):
  """The default pads small exact blocks beside a refresh that 1000-output
  roots dominate, and not the paper's MLP's 81-row blocks to its 785."""
  seen = refresh_groups_seen(monkeypatch)
  for sizes in ([26, 300, 20, 1000], [784, 80, 80, 80, 10]):
    params = mlp_params(jax.random.PRNGKey(0), sizes, jnp.float32)
    x, labels = blobs(jax.random.PRNGKey(1), n=8, d=sizes[0], classes=sizes[-1],
                      dtype=jnp.float32)
    (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels)
    tx = sngd_jax.sngd(0.1, nystrom=None)
    jax.eval_shape(functools.partial(tx.update, activations=acts), grads,
                   tx.init(params), params)
  assert sorted(seen[0]) == [[21, 27, 301]], seen
  assert sorted(seen[1]) == [[81], [785]], seen
