"""Misuse raises a ValueError at the first call, naming the parameter path
(a layer without an activations entry: a warning naming it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mlp_forward, mlp_params

import sngd_jax


@pytest.fixture
def setup():
  params = {"encoder": mlp_params(jax.random.PRNGKey(0), [5, 4, 3])}
  x = jnp.ones((6, 5))
  _, acts = mlp_forward(params["encoder"], x)
  grads = jax.tree.map(jnp.ones_like, params)
  tx = sngd_jax.sngd(0.1)
  return tx, tx.init(params), params, {"encoder": acts}, grads


def test_missing_params(setup):
  tx, state, _, acts, grads = setup
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, state, activations=acts)


def test_missing_activations(setup):
  tx, state, params, _, grads = setup
  with pytest.raises(ValueError, match="needs activations.*pass them on"):
    tx.update(grads, state, params)


def test_hand_built_activations_at_a_misnamed_path_raise_naming_it(setup):
  tx, state, params, acts, grads = setup
  with pytest.raises(ValueError, match=r"\['decoder/layer0', 'decoder/layer1'\]"
                     r" where the params have no layer"):
    tx.update(grads, state, params, activations={"decoder": acts["encoder"]})


def test_a_layer_without_its_entry_goes_plain_and_is_named(setup):
  tx, state, params, acts, grads = setup
  del acts["encoder"]["layer0"]
  with pytest.warns(UserWarning, match=r"encoder/layer0/kernel"):
    updates, _ = tx.update(grads, state, params, activations=acts)
  np.testing.assert_allclose(updates["encoder"]["layer0"]["kernel"],
                             -0.1 * grads["encoder"]["layer0"]["kernel"])


def test_activation_entry_not_a_dict(setup):
  tx, state, params, acts, grads = setup
  acts["encoder"]["layer1"] = jnp.ones((6, 4))
  with pytest.raises(ValueError, match="'encoder/layer1' must be a dict"):
    tx.update(grads, state, params, activations=acts)


def test_wrong_input_width(setup):
  tx, state, params, acts, grads = setup
  acts["encoder"]["layer1"]["inputs"] = jnp.ones((6, 7))
  with pytest.raises(ValueError, match=r"'encoder/layer1'.*\(6, 7\).*\(\.\.\., 4\)"):
    tx.update(grads, state, params, activations=acts)


def test_slopes_of_the_wrong_shape(setup):
  tx, state, params, acts, grads = setup
  acts["encoder"]["layer1"]["slopes"] = jnp.ones((6, 4))
  with pytest.raises(ValueError, match=r"'encoder/layer1'.*slopes.*\(6, 1\)"):
    tx.update(grads, state, params, activations=acts)


def test_wrong_output_shape_for_per_unit_kind(setup):
  _, _, params, acts, grads = setup
  tx = sngd_jax.sngd(0.1, layer_fisher="relu")
  acts["encoder"]["layer0"]["outputs"] = jnp.ones((5, 4))
  with pytest.raises(ValueError, match="'encoder/layer0'.*outputs"):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_missing_outputs_for_per_unit_kind(setup):
  _, _, params, acts, grads = setup
  tx = sngd_jax.sngd(0.1, layer_fisher="tanh")
  del acts["encoder"]["layer0"]["outputs"]
  with pytest.raises(ValueError, match=r"'encoder/layer0'\] needs 'outputs'"):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_integer_inputs_to_dense_layer(setup):
  tx, state, params, acts, grads = setup
  acts["encoder"]["layer0"]["inputs"] = jnp.ones((6, 5), jnp.int32)
  with pytest.raises(ValueError, match="'encoder/layer0'.*floating"):
    tx.update(grads, state, params, activations=acts)


def test_mismatched_bias(setup):
  _, _, params, _, _ = setup
  params["encoder"]["layer0"]["bias"] = jnp.ones(7)
  with pytest.raises(ValueError, match="encoder/layer0/bias"):
    sngd_jax.sngd(0.1).init(params)


def test_params_and_updates_differ(setup):
  tx, state, params, acts, grads = setup
  with pytest.raises(ValueError, match="different tree structures"):
    tx.update(grads, state, {"other": params}, activations=acts)


def test_unknown_kind_in_mapping_names_the_path(setup):
  _, _, params, _, _ = setup
  tx = sngd_jax.sngd(0.1, layer_fisher=lambda path: "gelu")
  with pytest.raises(ValueError, match="'encoder/layer0' is 'gelu'"):
    tx.init(params)


@pytest.mark.parametrize("options,message", [
    (dict(layer_fisher="gelu"), "layer_fisher must be one of"),
    (dict(layer_fisher={"encoder/*": "swish"}), r"layer_fisher\['encoder/\*'\]"),
    (dict(damping=-1.0), "damping must be >= 0"),
    (dict(relative_damping=-1e-3), "relative_damping must be >= 0"),
    (dict(damping=0.0, relative_damping=0.0), "must be > 0"),
    (dict(max_condition=0.5), "max_condition must be None or a number >= 1"),
    (dict(max_condition="1e3"), "max_condition must be None or a number >= 1"),
    (dict(inverse_every=0), "inverse_every must be an integer >= 1"),
    (dict(stats_every=1.5), "stats_every must be an integer >= 1"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(solver="svd"), "solver must be one of"),
    (dict(nystrom=128), "nystrom must be None or sngd_jax.Nystrom"),
    (dict(stats_positions=0), 'stats_positions must be None, "auto" or an integer >= 1'),
    (dict(stats_positions=True), 'stats_positions must be None, "auto" or an integer'),
    (dict(stats_positions="all"), 'stats_positions must be None, "auto" or an integer'),
    (dict(stats_positions=np.array(16)), "stats_positions is an array"),
])
def test_bad_options(options, message):
  with pytest.raises(ValueError, match=message):
    sngd_jax.sngd(0.1, **options)


def test_bad_nystrom_rank():
  with pytest.raises(ValueError, match="Nystrom.rank must be an int >= 2"):
    sngd_jax.Nystrom(rank=1)


def test_unpreconditioned_parameters_are_named_once(setup):
  tx, state, params, acts, grads = setup
  del acts["encoder"]["layer1"]
  params["encoder"]["temperature"] = jnp.ones(())
  grads["encoder"]["temperature"] = jnp.ones(())
  # Parameter paths throughout, and the warning points at this call.
  with pytest.warns(UserWarning, match=r"\['encoder/layer1/bias', "
                    r"'encoder/layer1/kernel', 'encoder/temperature'\]") as record:
    updates, _ = jax.jit(lambda g, s: tx.update(g, s, params, activations=acts))(
        grads, state)
  assert record[0].filename == __file__
  assert float(updates["encoder"]["temperature"]) == pytest.approx(-0.1)


def test_activations_of_layers_mapped_to_none_are_ignored(setup):
  _, _, params, acts, grads = setup
  tx = sngd_jax.sngd(0.1, layer_fisher={"encoder/layer0": "none"})
  with pytest.warns(UserWarning, match=r"\['encoder/layer0/bias', 'encoder/layer0/kernel'\]"):
    updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  assert sorted(state[0].stats) == ["encoder/layer1"]
  assert jnp.allclose(updates["encoder"]["layer0"]["kernel"], -0.1)


def test_refresh_axis_without_that_axis_names_it_and_says_how():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  x = jnp.ones((4, 3))
  acts = {"dense": {"inputs": x, "outputs": x @ params["dense"]["kernel"]}}
  tx = sngd_jax.scale_by_sngd(refresh_axis="data")
  with pytest.raises(ValueError, match="refresh_axis='data'.*jax.set_mesh"):
    tx.update(params, tx.init(params), params, activations=acts)
  with pytest.raises(ValueError, match="refresh_axis must be \"auto\", None or a mesh axis"):
    sngd_jax.scale_by_sngd(refresh_axis=0)


def test_models_under_vmap_without_vmap_axis_name_fail_at_trace(setup):
  tx, state, params, acts, grads = setup
  two = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)  # noqa: E731

  def update(grads, state, params, acts):
    return tx.update(grads, state, params, activations=acts)

  with pytest.raises(ValueError, match="batched by jax.vmap.*vmap_axis_name"):
    jax.vmap(update)(two(grads), two(state), two(params), two(acts))
  named = sngd_jax.sngd(0.1, vmap_axis_name="models")
  jax.vmap(lambda *args: named.update(*args[:3], activations=args[3]),
           axis_name="models")(two(grads), two(named.init(params)),
                               two(params), two(acts))


@pytest.mark.parametrize("axis_name", [None, "data"])
def test_pmap_without_axis_name_fails_at_trace(setup, axis_name):
  tx, state, params, acts, grads = setup
  one = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

  def update(grads, state, params, acts):
    return tx.update(grads, state, params, activations=acts)

  with pytest.raises(ValueError, match="pmap.*without axis_name.*drift"):
    jax.pmap(update, axis_name=axis_name)(one(grads), one(state), one(params),
                                          one(acts))
  told = sngd_jax.sngd(0.1, axis_name="data")
  jax.pmap(lambda *args: told.update(*args[:3], activations=args[3]),
           axis_name="data")(one(grads), one(told.init(params)), one(params),
                             one(acts))
