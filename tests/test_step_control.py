"""Step-size control: the KL clip, the EMA's warm-up, and solvers that refuse bad inverses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import blobs, every_block_kind, loss_and_acts, mlp_params, trainer

import sngd_jax
from sngd_jax import fisher, linalg

LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(4)(nn.relu(nn.Dense(32)(x)))


class TinyCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (5,), strides=2)(x[..., None]))
    x = nn.relu(nn.Conv(8, (5,), strides=2)(x))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def train_minibatches(make_tx, model, x, labels, steps=150, batch=50):
  """``lr -> (final params, losses)`` of minibatch training with ``make_tx(lr)``."""

  def loss_fn(params, idx):
    logits, acts = sngd_jax.linen_capture(model, {"params": params}, x[idx])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels[idx]).mean(), acts

  order = np.random.default_rng(0).integers(0, len(x), (steps, batch))
  return trainer(make_tx, model.init(jax.random.PRNGKey(0), x[:2])["params"],
                 loss_fn, order)


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(tree))


def generated(d):
  return blobs(jax.random.PRNGKey(1), n=1000, d=d, dtype=jnp.float32)


@pytest.mark.parametrize("model,d", [(TinyMLP, 20), (TinyCNN, 24)],
                         ids=["mlp", "cnn"])
def test_defaults_never_produce_nan_at_any_learning_rate(model, d):
  x, labels = generated(d)

  def final_losses(**options):
    trained = train_minibatches(
        lambda lr: sngd_jax.sngd(lr, **options), model(), x, labels)
    losses = []
    for lr in LEARNING_RATES:
      params, loss = trained(jnp.float32(lr))
      assert finite(params) or options.get("layer_fisher"), (lr, options)
      losses.append(float(np.mean(np.asarray(loss)[-20:])))
    return np.array(losses)

  for momentum in (0.0, 0.9):
    # And the steps are SNGD's: at its best lr it ends well below the plain
    # gradient's best (layer_fisher="none"; 0.61-0.77x, measured 2026-12-06).
    best = final_losses(momentum=momentum).min()
    plain = np.nanmin(final_losses(momentum=momentum, layer_fisher="none"))
    assert best < 0.85 * plain, (momentum, best, plain)


# Nystrom(rank=4, min_dim=8): the first layer (11 rows) takes the low-rank
# block, whose v . g the clip computes from its factors.
@pytest.mark.parametrize("nystrom", [None, sngd_jax.Nystrom(rank=4, min_dim=8)])
def test_kl_clip_bounds_lr_squared_v_dot_g_and_counts_the_clipped_steps(nystrom):
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=32)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)

  def direction(**options):
    tx = sngd_jax.scale_by_sngd(stats_every=1, inverse_every=1,
                                nystrom=nystrom, **options)
    updates, state = tx.update(grads, tx.init(params), params, activations=acts)
    vg = sum(float(jnp.vdot(v, g)) for v, g in
             zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
    return updates, vg, int(state.clipped)

  free, vg, clipped = direction(kl_clip=None)
  assert clipped == 0
  lr = 1.0
  kappa = 0.25 * lr ** 2 * vg  # binds: the step must shrink by half
  clipped_updates, _, clipped = direction(kl_clip=kappa, learning_rate=lr)
  assert clipped == 1
  # Scaled by sqrt(kappa / (lr^2 v.g)) = 1/2: lr^2 (v/2)^T G (v/2) = kappa.
  jax.tree.map(lambda c, f: np.testing.assert_allclose(c, 0.5 * f, rtol=1e-9),
               clipped_updates, free)
  # A bound it does not reach leaves the direction alone.
  same, _, clipped = direction(kl_clip=1.01 * vg, learning_rate=lr)
  assert clipped == 0
  jax.tree.map(lambda c, f: np.testing.assert_allclose(c, f, rtol=1e-12),
               same, free)


def vdot(a, b):
  return sum(float(jnp.vdot(x, y)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_momentum_clip_bounds_the_buffers_length_in_the_fisher_metric(nesterov):
  """Against the buffer's ``|m|_G^2`` as a double sum ``sum c_k c_l v_k . g_l``.

  With the preconditioner fixed after step 0 (``ema_decay=0``: no warm-up;
  no later statistics or refresh), ``G v_l = g_l``, so the buffer
  ``m = sum_k c_k v_k`` has ``m^T G m = sum_{k,l} c_k c_l v_k . g_l``; the
  directions ``v_k`` come from the clip-free transform.
  """
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  options = dict(ema_decay=0.0, stats_every=1000, inverse_every=1000,
                 nystrom=None)
  # A budget that binds on some steps only (Nesterov's step is longer).
  lr, beta, kappa = 0.1, 0.9, 0.06 if nesterov else 0.025
  free = sngd_jax.scale_by_sngd(kl_clip=None, **options)
  tx = sngd_jax.sngd(lr, momentum=beta, nesterov=nesterov, kl_clip=kappa,
                     **options)
  free_state, state = free.init(params), tx.init(params)
  # Jitted: each eager update would compile its conditionals anew.
  gradient = jax.jit(jax.value_and_grad(loss_and_acts, has_aux=True))
  free_update, tx_update = jax.jit(free.update), jax.jit(tx.update)
  directions, grads, coefficients = [], [], []
  bound_steps = 0
  for step in range(8):
    x, labels = blobs(jax.random.PRNGKey(10 + step), n=16)
    (_, acts), g = gradient(params, x, labels)
    v, free_state = free_update(g, free_state, params, activations=acts)
    updates, state = tx_update(g, state, params, activations=acts)
    directions.append(v)
    grads.append(g)
    def length(cs):  # |sum_k c_k v_k|_G^2
      return sum(ci * cj * vdot(directions[i], grads[j])
                 for i, ci in enumerate(cs) for j, cj in enumerate(cs))

    coefficients = [beta * c for c in coefficients] + [1.0]
    norm = length(coefficients)
    # Nesterov applies beta m + v: the clip bounds it and the buffer.
    applied = ([beta * c for c in coefficients[:-1]]
               + [beta * coefficients[-1] + 1.0] if nesterov else coefficients)
    longest = max(norm, length(applied))
    scale = min(1.0, (kappa / (lr ** 2 * longest)) ** 0.5)
    bound_steps += scale < 1
    coefficients = [scale * c for c in coefficients]
    step_coefficients = [scale * c for c in applied]
    # The step applied is within the budget.
    assert lr ** 2 * length(step_coefficients) <= kappa * (1 + 1e-6)
    expected = jax.tree.map(
        lambda *vs, cs=step_coefficients: -lr * sum(
            c * v for c, v in zip(cs, vs)),
        *directions)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-5,
                                                         atol=1e-8),
                 updates, expected)
    sngd_state = state[0]
    np.testing.assert_allclose(float(sngd_state.momentum_norm),
                               norm * scale ** 2, rtol=1e-5)
  # The bound binds on some steps and not on others: both branches checked.
  assert 0 < bound_steps < 8
  assert int(sngd_state.clipped) == bound_steps


@functools.cache
def block_kinds():
  """One layer of every block kind, its float64 statistic and its entry, by path."""
  layers, entries, _ = every_block_kind(unseen_rows=True)
  return {layer.path: (layer, layer.block.statistic(entries[layer.path], jnp.float64),
                       entries[layer.path]) for layer in layers}


def test_the_block_kinds_cover_every_block_class():
  def concrete(cls):
    for sub in cls.__subclasses__():
      yield from ([] if sub.__name__.startswith("_") else [sub])
      yield from concrete(sub)

  assert ({type(layer.block) for layer, _, _ in block_kinds().values()}
          == set(concrete(fisher._Block)))


@pytest.mark.parametrize("path", list(block_kinds()))
def test_every_blocks_metric_inverts_its_preconditioner(path):
  """``metric(P, m) = m^T P^{-1} m``: for ``v = P g``, ``v^T P^{-1} v = g^T P g``."""
  layer, stats, entry = block_kinds()[path]
  rows = sum(rows for _, _, rows in layer.leaves)  # the bias row included
  g = jax.random.normal(jax.random.PRNGKey(list(block_kinds()).index(path)),
                        (rows, layer.d_out))

  @jax.jit  # one program: eager, each op of each kind would compile alone
  def metric_and_quadratic(stats, g, entry):
    precond = layer.block.refresh(stats, linalg.Damping(1e-4, 1e-2, 1e3),
                                  "cholesky")
    v = layer.block.apply(precond, g, entry)
    return layer.block.metric(precond, v, entry), jnp.vdot(v, g)

  np.testing.assert_allclose(*metric_and_quadratic(stats, g, entry), rtol=1e-9)


def test_a_refresh_remeasures_the_momentum_buffer_in_the_new_metric():
  """After a refresh ``|m|_G^2`` is the buffer in the new blocks' metric:
  ``m^T (P^{-1} (x) F^{-1}) m`` per layer, with ``P^{-1}`` and ``F^{-1}``
  inverted by NumPy (``F`` the output factor the directions are multiplied by:
  ``G v = g`` for ``v = P g F``)."""
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  tx = sngd_jax.sngd(0.1, momentum=0.9, stats_every=1, inverse_every=3,
                     nystrom=None)
  state = tx.init(params)
  gradient = jax.jit(jax.value_and_grad(loss_and_acts, has_aux=True))
  for step in range(7):  # refreshes at steps 0, 3 and 6
    x, labels = blobs(jax.random.PRNGKey(10 + step), n=16)
    (_, acts), g = gradient(params, x, labels)
    buffer = state[0].momentum
    updates, state = tx.update(g, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
  sngd_state = state[0]
  expected = 0.0
  for path, precond in sngd_state.preconditioners.items():
    m = np.concatenate([np.asarray(buffer[path]["kernel"]),
                        np.asarray(buffer[path]["bias"])[None]])
    output = np.asarray(sngd_state.output_factors[path][0])
    expected += np.vdot(m, np.linalg.inv(np.asarray(precond)) @ m
                        @ np.linalg.inv(output))
  # The clip's measure at step 6: |beta m + v|_G^2 from |m|_G^2 in the new
  # metric; the stale one (the old metric's) would differ.
  v_dot_g = sum(jnp.vdot(d, gl) for d, gl in zip(
      jax.tree.leaves(jax.tree.map(lambda new, old: new - 0.9 * old,
                                   sngd_state.momentum, buffer)),
      jax.tree.leaves(g)))
  cross = sum(jnp.vdot(m, gl) for m, gl in zip(jax.tree.leaves(buffer),
                                                jax.tree.leaves(g)))
  np.testing.assert_allclose(
      float(sngd_state.momentum_norm),
      0.81 * expected + 2 * 0.9 * float(cross) + float(v_dot_g), rtol=1e-5)


@pytest.mark.parametrize("ema_decay, refreshed", [
    # Young (weight < 0.9) for its first 45 statistics, taken every step: a
    # refresh every stats_every steps; then every inverse_every steps.
    (0.95, [0, 10, 20, 30, 40, 100]),
    (0.0, [0, 100]),  # no EMA: no warm-up, the plain schedule
])
def test_a_young_ema_is_refreshed_every_stats_every_steps(ema_decay,
                                                          refreshed):
  params = mlp_params(jax.random.PRNGKey(0), [3, 2])
  tx = sngd_jax.scale_by_sngd(ema_decay=ema_decay, stats_every=10,
                              inverse_every=100, nystrom=None,
                              output_factor=False)
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.tree.map(jnp.ones_like, params)
  changed = []
  for step in range(130):
    x = jax.random.normal(jax.random.PRNGKey(step), (5, 3))
    _, acts = loss_and_acts(params, x, jnp.zeros(5, jnp.int32))
    old = state.preconditioners["layer0"]
    _, state = update(grads, state, params, activations=acts)
    if not np.array_equal(old, state.preconditioners["layer0"]):
      changed.append(step)
  assert changed == refreshed


class RecurrentModel(nn.Module):
  """A cell scanned over 8 steps and a head on its last state."""

  @nn.compact
  def __call__(self, x):
    h = nn.RNN(nn.SimpleCell(5, param_dtype=jnp.float64))(x[..., None])
    return nn.Dense(2, param_dtype=jnp.float64)(h[:, -1])


def recurrent_model():
  """``(params, activations, gradients(phase))`` of ``RecurrentModel``."""
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 8), jnp.float64)
  model = RecurrentModel()
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  _, acts = sngd_jax.linen_capture(model, {"params": params}, x)

  def gradients(phase):
    return jax.tree.map(lambda p: jnp.cos(
        phase + jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)

  return params, acts, gradients


@pytest.mark.parametrize("sharing", ["auto", "expand"])
def test_the_clip_counts_every_step_of_an_auto_expanded_recurrent_cell(sharing):
  """``auto`` expands a scanned cell's statistic (a mean over its steps) but
  measures the clip with the per-example Fisher's sum over them: its
  ``v . g`` counts 8 times; an explicit ``expand`` (a loss per step) once."""
  params, acts, gradients = recurrent_model()
  grads = gradients(0.0)

  def direction(**options):
    tx = sngd_jax.scale_by_sngd(stats_every=1, inverse_every=1, nystrom=None,
                                weight_sharing=sharing, **options)
    return tx.update(grads, tx.init(params), params, activations=acts)

  free, _ = direction(kl_clip=None)
  cell = vdot(free["SimpleCell_0"], grads["SimpleCell_0"])
  head = vdot(free["Dense_0"], grads["Dense_0"])
  measured = (8 if sharing == "auto" else 1) * cell + head
  clipped, state = direction(kl_clip=0.25 * measured)  # halves the step
  assert int(state.clipped) == 1
  jax.tree.map(lambda c, f: np.testing.assert_allclose(c, 0.5 * f, rtol=1e-6),
               clipped, free)


def test_a_refresh_that_keeps_the_blocks_keeps_the_buffers_length():
  """``|m|_G^2`` kept step by step (``beta^2 |m|^2 + 2 beta m.g + v.g``)
  equals the buffer measured anew by a refresh that leaves the blocks as
  they were (statistics of step 0 only, no EMA): both weigh a scanned cell's
  terms by its 8 uses, as the clip does."""
  params, acts, gradients = recurrent_model()

  def buffer_length(inverse_every):
    # A budget that never binds: a clipped buffer's length is the budget.
    tx = sngd_jax.sngd(0.1, momentum=0.9, ema_decay=0.0, stats_every=1000,
                       inverse_every=inverse_every, nystrom=None, kl_clip=1e6)
    state, update = tx.init(params), jax.jit(tx.update)
    for step in range(4):  # with inverse_every=3 remeasured at step 3
      _, state = update(gradients(float(step)), state, params,
                        activations=acts)
    return float(state[0].momentum_norm)

  np.testing.assert_allclose(buffer_length(3), buffer_length(1000), rtol=1e-6)


def test_input_scale_does_not_change_the_step():
  """The warm-up shrinks toward the statistic's own mean eigenvalue, not toward I."""
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=32)

  def first_layer_step(scale, bias=True):
    acts = {"layer0": {"inputs": scale * x}}
    p = {"layer0": params["layer0"] if bias else {
        "kernel": params["layer0"]["kernel"]}}
    grads = jax.tree.map(jnp.ones_like, p)
    tx = sngd_jax.scale_by_sngd(damping=0.0, kl_clip=None, nystrom=None)
    updates, _ = tx.update(grads, tx.init(p), p, activations=acts)
    return updates["layer0"]["kernel"]

  # Without a bias, inputs 10x larger make G exactly 100x larger, and with
  # no absolute damping every shift (the warm-up's shrinkage toward the mean
  # eigenvalue, the relative damping, the condition cap) and the normalized
  # output factor scale with it: the step is exactly 100x smaller. A
  # shrinkage toward I, or no preconditioner at all, breaks the ratio.
  np.testing.assert_allclose(first_layer_step(1.0, bias=False),
                             100 * first_layer_step(10.0, bias=False),
                             rtol=1e-9)
  # With a bias the ones column does not scale: the kernel's step shrinks
  # by less than 100x, but by more than 10x.
  small, large = first_layer_step(1.0), first_layer_step(10.0)
  ratio = np.linalg.norm(small) / np.linalg.norm(large)
  assert 10 < ratio < 100, ratio


def indefinite():
  return jnp.diag(jnp.array([2.0, 1.0, -0.5]))


@pytest.mark.parametrize("solver", ["eigh", "denman_beavers"])
def test_solvers_reject_an_indefinite_block(solver):
  assert not np.all(np.isfinite(linalg.inverse(indefinite(), solver)))
  spd = jnp.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 0.5]])
  np.testing.assert_allclose(linalg.inverse(spd, solver), np.linalg.inv(spd),
                             rtol=1e-6)


def test_denman_beavers_rejects_an_unconverged_root():
  """Condition number 1e30: 24 iterations cannot converge; the residual says so."""
  a = jnp.diag(jnp.array([1e15, 1.0, 1e-15]))
  assert not np.all(np.isfinite(linalg.denman_beavers_inverse(a)))


@pytest.mark.parametrize("solver", ["eigh", "denman_beavers"])
def test_a_rejected_inverse_is_counted_and_the_last_good_one_kept(solver):
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  grads = {"dense": {"kernel": jnp.ones((3, 2))}}
  # A negative damping (an array bypasses the option checks, as
  # inject_hyperparams' do) makes the damped block indefinite.
  tx = sngd_jax.scale_by_sngd(ema_decay=0.0, damping=jnp.asarray(-10.0),
                              relative_damping=jnp.asarray(0.0), solver=solver,
                              kl_clip=None)
  state = tx.init(params)
  acts = {"dense": {"inputs": jax.random.normal(jax.random.PRNGKey(0), (8, 3))}}
  updates, new = tx.update(grads, state, params, activations=acts)
  assert int(new.inverse_faults) == 1
  np.testing.assert_array_equal(new.preconditioners["dense"],
                                state.preconditioners["dense"])
  assert finite(updates)


def test_the_clip_reads_the_learning_rate_of_each_step():
  # A warm-up from lr 0: read at step 0, the clip would never bind.
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=32)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  schedule = optax.linear_schedule(0.0, 1.0, 4)
  kappa = 1e-3
  clipped = sngd_jax.scale_by_sngd(learning_rate=schedule, kl_clip=kappa)
  free = sngd_jax.scale_by_sngd(learning_rate=schedule, kl_clip=None)
  states = clipped.init(params), free.init(params)
  for step in range(4):
    d, clipped_state = clipped.update(grads, states[0], params,
                                      activations=acts)
    v, free_state = free.update(grads, states[1], params, activations=acts)
    states = clipped_state, free_state
    scale = vdot(d, grads) / vdot(v, grads)  # d = scale * v
    # The step's squared length lr^2 |d|_G^2 = lr^2 scale^2 v . g.
    assert float(schedule(step)) ** 2 * scale ** 2 * vdot(v, grads) <= (
        kappa * (1 + 1e-5)), step
  assert int(states[0].clipped) == 3  # every step but the first (lr 0)


def test_an_embeddings_condition_cap_counts_its_lookups_and_its_attend():
  # Row v's block is f_v I + C: its largest eigenvalue max f + max eig C.
  block = fisher.Embedding(vocab=5, dim=3)
  counts = jnp.array([0.5, 2.0, 0.1, 0.0, 1.0], jnp.float64)
  hidden = jnp.diag(jnp.array([0.3, 0.2, 0.1], jnp.float64))
  damping = linalg.Damping(0.0, 0.0, max_condition=10.0)
  precond = block.refresh({"counts": counts, "hidden": hidden}, damping,
                          "cholesky")
  np.testing.assert_allclose(precond["counts"] - counts, (2.0 + 0.3) / 10,
                             rtol=1e-12)
