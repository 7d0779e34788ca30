"""Numerical faults never corrupt the state; checkpoints and seeds reproduce runs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import blobs, loss_and_acts, mlp_forward, mlp_params
from hypothesis import given, settings
from hypothesis import strategies as st

import sngd_jax


def fresh(dtype=jnp.float32, **options):
  params = mlp_params(jax.random.PRNGKey(0), [6, 5, 3], dtype)
  x, labels = blobs(jax.random.PRNGKey(1), n=16, d=6, classes=3, dtype=dtype)
  tx = sngd_jax.scale_by_sngd(**{"stats_every": 1, "inverse_every": 1, **options})
  state = tx.init(params)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  # One good step first, so that there is a last good preconditioner to keep.
  _, state = tx.update(grads, state, params, activations=acts)
  return tx, state, params, acts, grads


def finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def corrupt(acts, value, layer="layer0"):
  acts = jax.tree.map(lambda a: a, acts)
  acts[layer]["inputs"] = acts[layer]["inputs"].at[0, 0].set(value)
  return acts


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf, -jnp.inf, 3e19])
def test_bad_activations_skip_the_statistic_and_keep_the_preconditioner(value):
  """NaN, Inf, and values whose square overflows float32."""
  tx, state, params, acts, grads = fresh()
  updates, new = tx.update(grads, state, params, activations=corrupt(acts, value))
  assert int(new.stats_faults) == 1 and int(new.inverse_faults) == 0
  np.testing.assert_array_equal(new.stats["layer0"], state.stats["layer0"])
  assert finite(new) and finite(updates)
  # The other layer skips the step too: the EMA's weight, shared, did not
  # move, and a statistic taken without it would be over-corrected.
  np.testing.assert_array_equal(new.stats["layer1"], state.stats["layer1"])
  assert float(new.stats_weight) == float(state.stats_weight)
  # The next good batch updates both, as one EMA step.
  _, after = tx.update(grads, new, params, activations=acts)
  _, reference = tx.update(grads, state, params, activations=acts)
  for layer in ("layer0", "layer1"):
    np.testing.assert_allclose(after.stats[layer], reference.stats[layer],
                               rtol=1e-6)


@pytest.mark.parametrize("name,make", [
    ("all zero", lambda x: jnp.zeros_like(x)),
    ("rank one", lambda x: jnp.outer(jnp.arange(x.shape[0], dtype=x.dtype), x[0])),
    ("duplicate rows", lambda x: jnp.broadcast_to(x[:1], x.shape)),
    ("huge but finite", lambda x: x * 1e15),
])
def test_degenerate_batches_give_finite_updates(name, make):
  tx, state, params, acts, grads = fresh(ema_decay=0.0)
  acts["layer0"]["inputs"] = make(acts["layer0"]["inputs"])
  updates, new = tx.update(grads, state, params, activations=acts)
  assert finite(updates) and finite(new), name
  assert int(new.stats_faults) == 0 and int(new.inverse_faults) == 0, name


def test_failed_inverse_keeps_the_last_good_one_and_is_counted():
  """A zero block with no damping at all, under the default cap (one
  attempt; uncapped, the retry fails too)."""
  params = {"dense": {"kernel": jnp.ones((4, 2), jnp.float32)}}  # no bias
  grads = {"dense": {"kernel": jnp.ones((4, 2), jnp.float32)}}
  # Arrays bypass the option checks (as inject_hyperparams' do).
  # The output factor off: the update is then the kept identity's.
  tx = sngd_jax.scale_by_sngd(ema_decay=0.0, damping=jnp.asarray(0.0),
                              relative_damping=jnp.asarray(0.0), kl_clip=None,
                              output_factor=False)
  state = tx.init(params)
  updates, new = tx.update(grads, state, params,
                           activations={"dense": {"inputs": jnp.zeros((8, 4))}})
  assert int(new.inverse_faults) == 1
  np.testing.assert_array_equal(new.preconditioners["dense"],
                                state.preconditioners["dense"])
  np.testing.assert_array_equal(updates["dense"]["kernel"], grads["dense"]["kernel"])


def test_nan_gradients_never_reach_params_with_apply_if_finite():
  _, _, params, acts, grads = fresh()
  tx = optax.apply_if_finite(sngd_jax.sngd(0.1), max_consecutive_errors=5)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  for _ in range(3):
    updates, state = tx.update(bad, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
  assert finite(params) and int(state.notfinite_count) == 3


@settings(max_examples=15, deadline=None)
@given(d_in=st.integers(1, 9), width=st.integers(1, 7), batch=st.integers(1, 5),
       kind=st.sampled_from(["linear", "relu", "tanh", "softmax"]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 99))
def test_updates_are_finite_typed_descent_directions(d_in, width, batch, kind,
                                                     dtype, seed):
  # NumPy arrays: each example's shapes are new, and JAX would compile every
  # eager op of the set-up for them (~2 s an example).
  rng = np.random.default_rng(seed)
  params = {f"layer{i}": {"kernel": rng.standard_normal((a, b)) / a ** 0.5,
                          "bias": 0.1 * rng.standard_normal(b)}
            for i, (a, b) in enumerate([(d_in, width), (width, 3)])}
  x = rng.standard_normal((batch, d_in))
  _, acts = mlp_forward(params, x, lambda h: np.maximum(h, 0))
  grads = jax.tree.map(lambda p: rng.standard_normal(p.shape), params)
  params, acts, grads = jax.tree.map(lambda a: a.astype(dtype),
                                     (params, acts, grads))
  tx = sngd_jax.scale_by_sngd(layer_fisher=kind, ema_decay=0.5)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert u.shape == g.shape and u.dtype == g.dtype
  assert finite(updates) and finite(state)
  inner = sum(jnp.vdot(u.astype(jnp.float32), g.astype(jnp.float32))
              for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)))
  assert float(inner) > 0
  # Preconditioned: not the gradient, nor a multiple of it (the identity
  # would pass every check above).
  u = jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                       for x in jax.tree.leaves(updates)])
  g = jnp.concatenate([jnp.ravel(x).astype(jnp.float32)
                       for x in jax.tree.leaves(grads)])
  cosine = jnp.vdot(u, g) / (jnp.linalg.norm(u) * jnp.linalg.norm(g))
  assert float(cosine) < 0.999, float(cosine)


def test_bfloat16_training_stays_finite_and_typed():
  params = mlp_params(jax.random.PRNGKey(0), [10, 16, 4], jnp.bfloat16)
  x, labels = blobs(jax.random.PRNGKey(1), n=64, d=10, dtype=jnp.bfloat16)
  tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=5)
  state = tx.init(params)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state[0].stats))

  @jax.jit
  def step(params, state):
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss, updates

  losses = []
  for _ in range(40):
    params, state, loss, updates = step(params, state)
    losses.append(float(loss))
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def run(steps, params, state, tx, x, labels):
  @jax.jit
  def step(params, state):
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(np.asarray(loss))
  return params, state, losses


def test_checkpoint_restores_bitwise_and_resumes_step_for_step(tmp_path):
  import orbax.checkpoint as ocp

  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4], jnp.float32)
  x, labels = blobs(jax.random.PRNGKey(1), n=64, d=10, dtype=jnp.float32)
  tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=3, stats_every=2)
  _, _, straight = run(20, params, tx.init(params), tx, x, labels)

  half_params, half_state, first = run(10, params, tx.init(params), tx, x, labels)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "ckpt", {"params": half_params, "opt": half_state})
  with ocp.StandardCheckpointer() as checkpointer:
    target = {"params": half_params, "opt": half_state}
    restored = checkpointer.restore(
        tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  jax.tree.map(np.testing.assert_array_equal, restored, target)
  assert jax.tree.structure(restored["opt"]) == jax.tree.structure(half_state)
  _, _, second = run(10, restored["params"], restored["opt"], tx, x, labels)
  np.testing.assert_array_equal(np.array(first + second), np.array(straight))


def test_same_seed_is_bitwise_deterministic():
  x, labels = blobs(jax.random.PRNGKey(1), n=64, d=10, dtype=jnp.float32)
  results = []
  for _ in range(2):
    params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4], jnp.float32)
    tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=3)
    results.append(run(8, params, tx.init(params), tx, x, labels))
  jax.tree.map(np.testing.assert_array_equal, results[0], results[1])


def test_near_singular_block_is_cured_by_more_damping():
  """A rank-one float32 block with negligible damping and no condition cap
  (the cap alone keeps it invertible): Cholesky fails, the retry works."""
  params = {"dense": {"kernel": jnp.ones((4, 2), jnp.float32)}}
  v = jnp.array([1e3, -7e2, 5e2, 3e2], jnp.float32)
  acts = {"dense": {"inputs": jnp.broadcast_to(v, (8, 4))}}
  grads = {"dense": {"kernel": jnp.ones((4, 2), jnp.float32)}}
  tx = sngd_jax.scale_by_sngd(ema_decay=0.0, damping=jnp.asarray(1e-9),
                              relative_damping=jnp.asarray(0.0),
                              max_condition=None)
  state = tx.init(params)
  updates, new = tx.update(grads, state, params, activations=acts)
  assert int(new.inverse_faults) == 1
  assert finite(updates) and finite(new.preconditioners)
  # The retried preconditioner is the inverse with relative damping 1e-3.
  g = np.outer(v, v).astype(np.float64)
  expected = np.linalg.inv(g + 1e-3 * np.trace(g) / 4 * np.eye(4))
  np.testing.assert_allclose(new.preconditioners["dense"], expected, rtol=2e-2)
  assert not np.array_equal(new.preconditioners["dense"], state.preconditioners["dense"])


# Six layers of 32 sigmoid units with the per-unit kind and momentum: their
# batched Cholesky factorizations (refresh, then the momentum's remeasure)
# hung the first step on a 2-core CPU when jaxlib split each over the
# threads running the program (jax 0.10.2). Run apart, so a hang fails.
_PER_UNIT_STEP = """
import jax, jax.numpy as jnp, optax, sngd_jax
from helpers import blobs, loss_and_acts, mlp_params
params = mlp_params(jax.random.PRNGKey(0), [8] + [32] * 6 + [3], jnp.float32)
x, labels = blobs(jax.random.PRNGKey(1), n=32, d=8, classes=3, dtype=jnp.float32)
tx = sngd_jax.sngd(0.1, momentum=0.9, layer_fisher="sigmoid")
state = tx.init(params)

@jax.jit
def step(params, state):
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, labels)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state

params, state = step(params, state)
assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
print("done")
"""

# Eight models of 64 ReLU units under jax.vmap (the guide's "Eight seeds at
# once" with per-unit kinds): the vmap multiplied each batch of blocks by the
# models, over the split again; it hung four runs in five.
_PER_UNIT_VMAP = """
import jax, jax.numpy as jnp, optax, sngd_jax
from helpers import blobs, loss_and_acts, mlp_params
keys = jax.random.split(jax.random.PRNGKey(0), 8)
params = jax.vmap(lambda k: mlp_params(k, [20, 64, 64, 5], jnp.float32))(keys)
x, labels = blobs(jax.random.PRNGKey(1), n=256, d=20, classes=5, dtype=jnp.float32)
tx = sngd_jax.sngd(0.1, momentum=0.9, vmap_axis_name="seeds",
                   layer_fisher={"layer0": "relu", "layer1": "relu", "*": "linear"})

def step(params, state):
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, labels)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state

state = jax.vmap(tx.init)(params)
step = jax.jit(jax.vmap(step, axis_name="seeds"))
for _ in range(50):  # a refresh every 10 steps: each a chance to hang
  params, state = step(params, state)
assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(params))
print("done")
"""


@pytest.mark.parametrize("script", [_PER_UNIT_STEP, _PER_UNIT_VMAP],
                         ids=["six-layers", "vmap-eight-models"])
def test_per_unit_blocks_with_momentum_do_not_hang_the_step(script):
  here = os.path.dirname(__file__)
  env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
  # Compiled as users' programs are (with the suite's optimizations off the
  # vmap case did not hang; conftest's XLA_FLAGS), with OpenBLAS on one
  # thread as `make` and the benchmark set it (with one per core the vmap
  # case hung less often).
  env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS", None)
  env.pop("XLA_FLAGS", None)
  env["OPENBLAS_NUM_THREADS"] = "1"
  result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env,
                          capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "done" in result.stdout
