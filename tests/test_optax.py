"""SNGD composes with Optax's chains and wrappers, under jit, without recompiling."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_tree_close, blobs, loss_and_acts, mlp_params

import sngd_jax


def setup():
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=32)
  (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  return params, acts, grads


def direction(params, acts, grads, **options):
  tx = sngd_jax.scale_by_sngd(**options)
  return tx.update(grads, tx.init(params), params, activations=acts)[0]


def test_sngd_without_arguments_chains_like_scale_by_adam():
  params, acts, grads = setup()
  tx = optax.chain(sngd_jax.sngd(), optax.sgd(0.1))
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  assert_tree_close(updates, jax.tree.map(lambda d: -0.1 * d,
                                          direction(params, acts, grads)),
                    rtol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_complete_optimizer_is_chain_of_parts(nesterov):
  """Without the clip, SNGD's own momentum is ``optax.trace``'s; weight decay
  comes after it (outside the momentum, like AdamW)."""
  params, acts, grads = setup()
  tx = sngd_jax.sngd(0.1, momentum=0.9, nesterov=nesterov, weight_decay=1e-2,
                     kl_clip=None)
  state = tx.init(params)
  reference = optax.chain(sngd_jax.scale_by_sngd(kl_clip=None),
                          optax.trace(0.9, nesterov=nesterov),
                          optax.add_decayed_weights(1e-2),
                          optax.scale_by_learning_rate(0.1))
  ref_state = reference.init(params)
  for step in range(3):
    grads = jax.tree.map(lambda g, k=1 + step: g * k, grads)  # new lengths
    updates, state = tx.update(grads, state, params, activations=acts)
    expected, ref_state = reference.update(grads, ref_state, params,
                                           activations=acts)
    assert_tree_close(updates, expected, rtol=1e-12)


def test_schedule_and_clipping():
  params, acts, grads = setup()
  schedule = optax.linear_schedule(0.1, 0.0, 4)
  tx = optax.chain(optax.clip_by_global_norm(1e-3), sngd_jax.sngd(schedule))
  state = tx.init(params)
  clipped = optax.clip_by_global_norm(1e-3).update(grads, None)[0]
  for _ in range(2):
    updates, state = tx.update(grads, state, params, activations=acts)
  # step 1: lr 0.075; the statistic was updated twice with the same batch.
  tx2 = sngd_jax.scale_by_sngd()
  s2 = tx2.init(params)
  for _ in range(2):
    d, s2 = tx2.update(clipped, s2, params, activations=acts)
  assert_tree_close(updates, jax.tree.map(lambda v: -0.075 * v, d), rtol=1e-6)


def test_inject_hyperparams_changes_learning_rate_between_steps():
  params, acts, grads = setup()
  tx = optax.inject_hyperparams(sngd_jax.sngd, static_args=("nesterov",))(
      learning_rate=0.1, damping=1e-3, inverse_every=5)
  state = tx.init(params)
  first, state = tx.update(grads, state, params, activations=acts)
  state.hyperparams["learning_rate"] = jnp.asarray(0.01)
  second, state = tx.update(grads, state, params, activations=acts)
  # No refresh at step 1 (inverse_every=5): the direction is the same.
  assert_tree_close(second, jax.tree.map(lambda u: 0.1 * u, first), rtol=1e-6)
  assert isinstance(state.hyperparams["inverse_every"], jax.Array)


def test_inject_hyperparams_max_condition_is_traced():
  params, acts, grads = setup()
  injected = optax.inject_hyperparams(sngd_jax.sngd)(learning_rate=0.1,
                                                     max_condition=1e3)
  state = injected.init(params)
  state.hyperparams["max_condition"] = jnp.asarray(3.0)
  capped, _ = injected.update(grads, state, params, activations=acts)
  static = sngd_jax.sngd(0.1, max_condition=3.0)
  expected, _ = static.update(grads, static.init(params), params,
                              activations=acts)
  assert_tree_close(capped, expected, rtol=1e-5)
  uncapped = sngd_jax.sngd(0.1, max_condition=None)
  plain, _ = uncapped.update(grads, uncapped.init(params), params,
                             activations=acts)
  assert not np.allclose(plain["layer0"]["kernel"], capped["layer0"]["kernel"],
                         rtol=1e-2)


def test_inject_hyperparams_under_jit_with_array_intervals():
  params, acts, grads = setup()
  tx = optax.inject_hyperparams(sngd_jax.sngd)(learning_rate=0.1,
                                                stats_every=2, inverse_every=2)
  step = jax.jit(lambda s: tx.update(grads, s, params, activations=acts))
  state = tx.init(params)
  for _ in range(3):
    _, state = step(state)
  assert int(state.inner_state[0].count) == 3


def test_inject_hyperparams_keeps_stats_positions_static_or_says_how():
  params, acts, grads = setup()
  # The default ("auto") is not numeric, so it is not made a hyperparameter.
  tx = optax.inject_hyperparams(sngd_jax.sngd)(learning_rate=0.1)
  state = tx.init(params)
  assert "stats_positions" not in state.hyperparams
  jax.jit(lambda s: tx.update(grads, s, params, activations=acts))(state)
  # An int would be traced: refused, with the way out.
  with pytest.raises(ValueError, match=r"static_args=\('stats_positions',\)"):
    optax.inject_hyperparams(sngd_jax.sngd)(
        learning_rate=0.1, stats_positions=16).init(params)
  tx = optax.inject_hyperparams(sngd_jax.sngd, static_args=("stats_positions",))(
      learning_rate=0.1, stats_positions=16)
  tx.update(grads, tx.init(params), params, activations=acts)


def test_multisteps_applies_the_summed_gradient_with_the_last_micro_batchs_statistics():
  """What the guide promises under MultiSteps: the accumulated gradient, and
  the local Fisher of the micro-batch whose update applies it (the EMA
  averages over steps)."""
  params = mlp_params(jax.random.PRNGKey(0), [10, 8, 4])
  micro = []
  for seed in (1, 2):
    x, labels = blobs(jax.random.PRNGKey(seed), n=32)
    (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels)
    micro.append((acts, grads))
  tx = optax.MultiSteps(sngd_jax.sngd(0.1), every_k_schedule=2)
  state = tx.init(params)
  first, state = tx.update(micro[0][1], state, params, activations=micro[0][0])
  assert all(np.all(u == 0) for u in jax.tree.leaves(first))
  second, state = tx.update(micro[1][1], state, params, activations=micro[1][0])
  mean = jax.tree.map(lambda a, b: (a + b) / 2, micro[0][1], micro[1][1])
  expected = direction(params, micro[1][0], mean, learning_rate=0.1)
  assert_tree_close(second, jax.tree.map(lambda d: -0.1 * d, expected),
                    rtol=1e-6, atol=1e-9)
  other = direction(params, micro[0][0], mean, learning_rate=0.1)
  assert not np.allclose(other["layer0"]["kernel"],
                         expected["layer0"]["kernel"], rtol=1e-3)


def _conds(jaxpr) -> int:
  """``cond`` equations in a jaxpr, nested ones included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "cond"
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _conds(sub)
  return count


# relu: per-unit blocks, factored one model at a time under the vmap
# (fisher.batched's batching rule).
@pytest.mark.parametrize("layer_fisher", ["linear", "relu"])
def test_vmap_over_models_equals_the_loop_and_keeps_its_conditionals(layer_fisher):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  params = jax.vmap(lambda k: mlp_params(k, [10, 8, 4]))(keys)
  x, labels = blobs(jax.random.PRNGKey(1), n=32)
  options = dict(momentum=0.9, stats_every=2, inverse_every=3,
                 layer_fisher=layer_fisher)

  def train(tx, params, steps=7):
    def step(carry, _):  # a scan: one update in the program, not seven
      params, state = carry
      (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
          params, x, labels)
      updates, state = tx.update(grads, state, params, activations=acts)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0]

  vmapped = jax.jit(jax.vmap(
      lambda p: train(sngd_jax.sngd(0.1, vmap_axis_name="models", **options), p),
      axis_name="models"))
  got_params, got_state = vmapped(params)
  single = jax.jit(lambda p: train(sngd_jax.sngd(0.1, **options), p))
  for i in range(4):
    want_params, want_state = single(jax.tree.map(lambda a, i=i: a[i], params))
    assert_tree_close(jax.tree.map(lambda a, i=i: a[i], got_params),
                      want_params, rtol=1e-9, atol=1e-12)
    for field in ("stats", "output_factors"):
      assert_tree_close(jax.tree.map(lambda a, i=i: a[i], getattr(got_state[0], field)),
                        getattr(want_state[0], field), rtol=1e-9, atol=1e-12)
  assert int(got_state[0].count[0]) == 7

  def update_jaxpr(name):
    tx = sngd_jax.sngd(0.1, vmap_axis_name=name, **options)
    one = jax.tree.map(lambda a: a[0], params)
    (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        one, x, labels)
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 4), tree)
    update = lambda g, s, p, a: tx.update(g, s, p, activations=a)
    return jax.make_jaxpr(jax.vmap(update, axis_name="models"))(
        stack(grads), jax.vmap(tx.init)(params), params, stack(acts)).jaxpr

  # Statistics, one refresh per layer, the output factors' statistics and one refresh per layer
  # (linear blocks have them), the momentum buffer's remeasure at a refresh:
  # conditionals, not selects that would run them at every step.
  output_factor_conds = 1 + 2 if layer_fisher == "linear" else 0
  assert _conds(update_jaxpr("models")) == 1 + 2 + output_factor_conds + 1
  # Without it the conds would become selects running every branch at every
  # step (a width-128 model's step hung on CPU): an error says what to pass.
  with pytest.raises(ValueError, match="vmap_axis_name"):
    update_jaxpr(None)


def test_tree_map_params_maps_the_params_shaped_parts_of_the_state():
  params, acts, grads = setup()
  tx = sngd_jax.sngd(0.1, momentum=0.9)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, activations=acts)
  cast = optax.tree_utils.tree_map_params(
      tx, lambda p: p.astype(jnp.float32), state)
  momentum = cast[0].momentum
  assert jax.tree.structure(momentum) == jax.tree.structure(params)
  assert all(m.dtype == jnp.float32 for m in jax.tree.leaves(momentum))
  # The statistics are not params-shaped: passed through, or given to
  # transform_non_params whole.
  assert_tree_close(cast[0].stats, state[0].stats, rtol=0)
  marked = optax.tree_utils.tree_map_params(
      tx, lambda p: "param", state, transform_non_params=lambda _: "other")
  assert marked[0].stats == "other"
  assert jax.tree.leaves(marked[0].momentum) == ["param"] * 4


def test_apply_if_finite_blocks_nan_gradients():
  params, acts, grads = setup()
  tx = optax.apply_if_finite(sngd_jax.sngd(0.1), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  updates, state = tx.update(bad, state, params, activations=acts)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
  assert int(state.notfinite_count) == 1
  updates, state = tx.update(grads, state, params, activations=acts)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert any(np.any(u != 0) for u in jax.tree.leaves(updates))


def test_state_survives_jit_and_steps_do_not_recompile(monkeypatch):
  params, acts, grads = setup()
  plans = []  # each trace of init or update plans the layers once
  plan_layers = sngd_jax.transform.plan_layers
  monkeypatch.setattr(sngd_jax.transform, "plan_layers",
                      lambda *a: plans.append(1) or plan_layers(*a))
  tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=2)
  traces = []

  @jax.jit
  def step(params, state, acts, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  eager_params, eager_state = params, state
  for _ in range(5):
    params, state = step(params, state, acts, grads)
    updates, eager_state = tx.update(grads, eager_state, eager_params,
                                     activations=acts)
    eager_params = optax.apply_updates(eager_params, updates)
  assert len(traces) == 1
  # Called eagerly, the update too is traced once and reused: init, then the
  # eager update and the one inside step (JAX may share their one trace).
  assert len(plans) <= 3, len(plans)
  assert isinstance(state[0], sngd_jax.ScaleBySNGDState)
  assert int(state[0].count) == 5
  assert_tree_close(params, eager_params, rtol=1e-6)


def test_multi_transform_and_masked_take_the_full_activations():
  params, acts, grads = setup()
  labels = {"layer0": "sngd", "layer1": "adam"}
  tx = optax.multi_transform({"sngd": sngd_jax.sngd(0.1), "adam": optax.adam(1e-3)},
                             {k: jax.tree.map(lambda _, v=v: v, params[k])
                              for k, v in labels.items()})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  # layer0: SNGD on its own; layer1: Adam on its own.
  alone = {"layer0": params["layer0"]}
  expected = jax.tree.map(lambda d: -0.1 * d, direction(
      alone, {"layer0": acts["layer0"]}, {"layer0": grads["layer0"]},
      learning_rate=0.1))
  assert_tree_close(updates["layer0"], expected["layer0"], rtol=1e-6)
  adam = optax.adam(1e-3)
  expected_adam, _ = adam.update(grads["layer1"], adam.init(params["layer1"]))
  assert_tree_close(updates["layer1"], expected_adam, rtol=1e-6)

  masked = optax.masked(sngd_jax.sngd(0.1), {"layer0": True, "layer1": False})
  updates, _ = masked.update(grads, masked.init(params), params,
                             activations=acts)
  assert_tree_close(updates["layer0"], expected["layer0"], rtol=1e-6)
  # A masked layer's entry is fine (above); a misnamed one raises.
  with pytest.raises(ValueError, match=r"\['layer9'\]"):
    masked.update(grads, masked.init(params), params,
                  activations={"layer9": acts["layer0"], "layer1": acts["layer1"]})


def test_inject_hyperparams_rounding_options_fail_with_advice_and_no_buffers():
  params, acts, grads = setup()
  low = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match="hyperparam_dtype=jnp.float32"):
    optax.inject_hyperparams(sngd_jax.sngd)(learning_rate=0.1).init(low)
  tx = optax.inject_hyperparams(sngd_jax.sngd, hyperparam_dtype=jnp.float32)(
      learning_rate=0.1, ema_decay=0.999)
  state = tx.init(low)
  assert state.hyperparams["ema_decay"].dtype == jnp.float32
  # No momentum or weight decay asked for: none allocated (SNGD's state and
  # the learning rate's, no params-sized trace).
  kinds = [type(part) for part in state.inner_state]
  assert kinds == [sngd_jax.ScaleBySNGDState, optax.EmptyState]


def test_patterns_that_match_nothing_warn_and_boolean_intervals_fail():
  params, _, _ = setup()
  with pytest.warns(UserWarning, match="'layr0'"):
    sngd_jax.sngd(0.1, layer_fisher={"layr0": "relu"}).init(params)
  with pytest.raises(ValueError, match="stats_every"):
    sngd_jax.sngd(0.1, stats_every=True)


def test_refresh_axis_auto_leaves_the_one_device_program_as_it_was():
  # The default "auto" divides the refresh only under a mesh with one axis
  # of several devices (tests/sharding_check.py); on one device, the same
  # program as refresh_axis=None.
  params, acts, grads = setup()

  def program(**options):
    tx = sngd_jax.sngd(0.1, momentum=0.9, **options)
    return jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a)).lower(
        grads, tx.init(params), params, acts).as_text()

  assert program() == program(refresh_axis=None)
  mesh = jax.make_mesh((1,), ("data",))
  with jax.set_mesh(mesh):
    assert program() == program(refresh_axis=None)
