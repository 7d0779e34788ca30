"""Weight-shared layers against the exact Fisher built from autodiff Jacobians.

Under a Gaussian likelihood (identity output covariance) the Fisher of a layer
is ``E[J^T J]``, exactly Kronecker ``G (x) I``: SNGD's ``linear`` block is then
exact NGD, and the scale of ``G`` is what weight sharing decides.
- reduce (one loss per example, summed over its positions): the per-example
  Jacobian sums over positions, ``G = E_n[sum_t x~_t x~_t^T]``;
- expand (a loss per position, averaged): every position is an example,
  ``G = E_{n,t}[x~ x~^T]``.
"""

import collections

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_tree_close
from test_exact_ngd import FORMULA, damp

import sngd_jax
from sngd_jax import fisher

CLOSE = dict(rtol=1e-8, atol=1e-12)


def exact_ngd(model, params, examples, grads):
  """``damp(F)^{-1} g`` with ``F = mean_n J_n^T J_n``, ``J_n`` of all of example n's outputs."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.vmap(lambda x: jax.jacobian(
      lambda f: jnp.ravel(model(unravel(f), x[None])))(flat))(examples)
  fisher = np.asarray(jnp.einsum("nop,noq->pq", jac, jac)) / len(examples)
  g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
  return unravel(jnp.asarray(np.linalg.solve(damp(fisher), g)))


def sngd_update(params, grads, acts, sharing):
  tx = sngd_jax.scale_by_sngd(**FORMULA, weight_sharing=sharing)
  return tx.update(grads, tx.init(params), params, activations=acts)[0]


def test_conv_with_a_per_example_loss_is_exact_ngd_with_reduce():
  conv = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0),
                  param_dtype=jnp.float64)
  graphdef, params = nnx.split(conv, nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 6, 6, 2), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (6, 3, 3, 3), jnp.float64)

  def model(p, x):
    return nnx.merge(graphdef, p)(x)

  def loss(p):  # one loss per example: summed over its 9 positions
    return 0.5 * jnp.mean(jnp.sum((model(p, x) - y) ** 2, axis=(1, 2, 3)))

  grads = jax.grad(loss)(params)
  _, acts = sngd_jax.nnx_capture(nnx.merge(graphdef, params), x)
  expected = exact_ngd(model, params, x, grads)
  assert_tree_close(sngd_update(params, grads, acts, "reduce"), expected, **CLOSE)
  # Averaging over positions instead takes a step 9 times too long.
  wrong = sngd_update(params, grads, acts, "expand")
  np.testing.assert_allclose(
      np.linalg.norm(jax.flatten_util.ravel_pytree(wrong)[0])
      / np.linalg.norm(jax.flatten_util.ravel_pytree(expected)[0]), 9, rtol=0.3)


def test_dense_shared_over_positions_with_a_per_position_loss_is_exact_with_expand():
  dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  graphdef, params = nnx.split(dense, nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 7, 4), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (5, 7, 3), jnp.float64)

  def model(p, x):
    return nnx.merge(graphdef, p)(x)

  def loss(p):  # a loss per position, averaged over all 35 of them
    return 0.5 * jnp.mean(jnp.sum((model(p, x) - y) ** 2, axis=-1))

  grads = jax.grad(loss)(params)
  _, acts = sngd_jax.nnx_capture(nnx.merge(graphdef, params), x)
  assert acts["inputs"].shape == (5, 7, 4)
  positions = x.reshape(35, 1, 4)  # every position is an example
  expected = exact_ngd(model, params, positions, grads)
  assert_tree_close(sngd_update(params, grads, acts, "expand"), expected, **CLOSE)


class TeacherForcedCell(nnx.Module):
  """A recurrent cell ``h_t = W [x_t; s_t] + b`` unrolled by ``lax.scan``.

  The previous states ``s_t`` are given (teacher forcing), so the cell's
  Jacobian is that of a dense layer at each step and the exact Fisher is
  Kronecker.
  """

  def __init__(self, rngs):
    self.cell = nnx.Linear(3 + 2, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x, states):
    def step(carry, inputs):
      return carry, self.cell(jnp.concatenate(inputs, axis=-1))
    _, h = jax.lax.scan(step, None, (x.swapaxes(0, 1), states.swapaxes(0, 1)))
    return h.swapaxes(0, 1)


def test_recurrent_cell_unrolled_over_time_is_exact_ngd_with_reduce():
  graphdef, params = nnx.split(TeacherForcedCell(nnx.Rngs(0)), nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 5, 3), jnp.float64)
  states = jax.random.normal(jax.random.PRNGKey(2), (6, 5, 2), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(3), (6, 5, 2), jnp.float64)
  data = jnp.concatenate([x, states], axis=-1)

  def model(p, data):
    return nnx.merge(graphdef, p)(data[..., :3], data[..., 3:])

  def loss(p):  # one loss per sequence: summed over its 5 steps
    return 0.5 * jnp.mean(jnp.sum((model(p, data) - y) ** 2, axis=(1, 2)))

  grads = jax.grad(loss)(params)
  _, acts = sngd_jax.nnx_capture(nnx.merge(graphdef, params), x, states)
  assert acts["cell"]["inputs"].shape == (6, 5, 5)  # examples, steps, features
  expected = exact_ngd(model, params, data, grads)
  assert_tree_close(sngd_update(params, grads, acts, "reduce"), expected, **CLOSE)


@pytest.mark.parametrize("sharing,scale", [("reduce", 2.0), ("expand", 1.0)])
def test_a_module_called_twice_counts_both_uses_of_each_example(sharing, scale):
  params = {"dense": {"kernel": jnp.ones((3, 2), jnp.float64)}}
  first = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
  second = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
  acts = {"dense": {"inputs": jnp.stack([first, second], axis=1)}}
  tx = sngd_jax.scale_by_sngd(**FORMULA, weight_sharing={"dense": sharing})
  state = tx.update(params, tx.init(params), params, activations=acts)[1]
  rows = np.concatenate([first, second])
  np.testing.assert_allclose(state.stats["dense"],
                             scale * rows.T @ rows / len(rows), rtol=1e-12)


def test_auto_expands_cells_captured_in_a_scan_and_reduces_the_rest():
  from flax import linen as nn

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (3,), strides=2, param_dtype=jnp.float64)(x[..., None])
      # A cell scanned over the conv's 4 output positions.
      h = nn.RNN(nn.SimpleCell(5, param_dtype=jnp.float64,
                               carry_init=nn.initializers.zeros))(x)
      return nn.Dense(2, param_dtype=jnp.float64)(h[:, -1])

  x = jax.random.normal(jax.random.PRNGKey(0), (6, 8), jnp.float64)
  model = Model()
  variables = model.init(jax.random.PRNGKey(1), x)
  _, acts = sngd_jax.linen_capture(model, variables, x)
  params = variables["params"]
  grads = jax.tree.map(jnp.ones_like, params)

  def stats(sharing):
    tx = sngd_jax.scale_by_sngd(**FORMULA, weight_sharing=sharing)
    return tx.update(grads, tx.init(params), params, activations=acts)[1].stats

  auto, reduce, expand = stats("auto"), stats("reduce"), stats("expand")
  assert set(auto) == set(reduce)
  for path in auto:
    cell = path.startswith("SimpleCell_0")
    # The cell's statistic is the mean over its 4 steps; the conv's the sum
    # over its 4 positions (4x the mean); the head has one use either way.
    np.testing.assert_allclose(auto[path], (expand if cell else reduce)[path],
                               rtol=1e-12)
    if path != "Dense_0":
      np.testing.assert_allclose(reduce[path], 4 * expand[path], rtol=1e-12)
  assert {"SimpleCell_0/h", "SimpleCell_0/i", "Conv_0"} <= set(auto)
  # A mapping's unmatched layers get "auto" too.
  mapped = stats({"Dense_0": "reduce"})
  for path in auto:
    np.testing.assert_allclose(mapped[path], auto[path], rtol=1e-12)


def test_auto_expands_a_cell_that_uses_its_layer_twice_a_step():
  # Recorded inside a scan with two uses a step, the entry is (B, T, 2, d):
  # two position axes, which outside a scan would read as an image's.

  class Cell(nnx.Module):
    def __init__(self, rngs):
      self.shared = nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, xs):
      def step(h, x):
        h = jnp.tanh(self.shared(x) + self.shared(h))
        return h, h
      return jax.lax.scan(step, jnp.zeros_like(xs[:, 0]),
                          jnp.swapaxes(xs, 0, 1))[0]

  model = Cell(nnx.Rngs(0))
  xs = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 3), jnp.float64)
  _, acts = sngd_jax.nnx_capture(model, xs)
  assert np.shape(acts["shared"]["inputs"]) == (4, 5, 2, 3)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.ones_like, params)

  def stats(sharing):
    tx = sngd_jax.scale_by_sngd(**FORMULA, weight_sharing=sharing)
    return tx.update(grads, tx.init(params), params, activations=acts)[1].stats

  auto, expand, reduce = stats("auto"), stats("expand"), stats("reduce")
  np.testing.assert_allclose(auto["shared"], expand["shared"], rtol=1e-12)
  np.testing.assert_allclose(reduce["shared"], 10 * expand["shared"],
                             rtol=1e-12)


def test_auto_expands_tokens_and_reduces_an_images_positions():
  """Tokens (one position axis: inputs ``(B, L, d)``, ids ``(B, L)``) expand,
  and the clip counts each token once, as an explicit ``expand`` does; an
  image's ``H x W`` positions and a convolution reduce."""
  f64 = jnp.float64
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 8))
  params = {
      "tokens": {"kernel": jax.random.normal(next(keys), (3, 2), f64),
                 "bias": jnp.zeros(2, f64)},
      "embed": {"embedding": jax.random.normal(next(keys), (5, 3), f64)},
      "image": {"kernel": jax.random.normal(next(keys), (3, 2), f64)},
      "conv": {"kernel": jax.random.normal(next(keys), (3, 1, 2), f64),
               "bias": jnp.zeros(2, f64)}}
  tokens = jax.random.normal(next(keys), (4, 6, 3), f64)
  image = jax.random.normal(next(keys), (4, 2, 3, 3), f64)
  conv = nnx.Conv(1, 2, (3,), rngs=nnx.Rngs(0), param_dtype=f64)
  _, conv_acts = sngd_jax.nnx_capture(
      conv, jax.random.normal(next(keys), (4, 5, 1), f64))
  acts = {"tokens": {"inputs": tokens,
                     "outputs": tokens @ params["tokens"]["kernel"]},
          "embed": {"inputs": jax.random.randint(next(keys), (4, 6), 0, 5)},
          "image": {"inputs": image, "outputs": image @ params["image"]["kernel"]},
          "conv": conv_acts}
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)
                                         ).reshape(p.shape), params)
  explicit = {"tokens": "expand", "embed": "expand", "image": "reduce",
              "conv": "reduce"}

  def update(sharing, kl_clip=None):
    tx = sngd_jax.scale_by_sngd(**{**FORMULA, "kl_clip": kl_clip},
                                weight_sharing=sharing)
    return tx.update(grads, tx.init(params), params, activations=acts)

  auto, expand, reduce = (update(mode)[1].stats
                          for mode in ("auto", "expand", "reduce"))
  for path, mode in explicit.items():
    want, other = (sngd_jax.layer_slice(stats, path) for stats in (
        (expand, reduce) if mode == "expand" else (reduce, expand)))
    mine = sngd_jax.layer_slice(auto, path)
    assert_tree_close(mine, want, **CLOSE)
    assert not np.allclose(jax.tree.leaves(mine)[0],
                           jax.tree.leaves(other)[0]), path
  # A clip that binds: the same step only if every token counts once.
  free = update("auto")[0]
  clip = 1e-3 * sum(float(vdot) for vdot in jax.tree.leaves(
      jax.tree.map(lambda u, g: jnp.vdot(u, g), free, grads)))
  assert_tree_close(update("auto", clip)[0], update(explicit, clip)[0],
                    **CLOSE)


def test_weight_sharing_rejects_unknown_modes_naming_the_layer():
  params = {"dense": {"kernel": jnp.ones((3, 2))}}
  with pytest.raises(ValueError, match="weight_sharing"):
    sngd_jax.scale_by_sngd(weight_sharing="sum")
  tx = sngd_jax.scale_by_sngd(weight_sharing=lambda path: "mean")
  with pytest.raises(ValueError, match="'dense'"):
    tx.update(params, tx.init(params), params,
              activations={"dense": {"inputs": jnp.ones((2, 3))}})


def test_sampled_positions_keep_the_statistics_scale():
  # A spatially constant input under circular padding: every position's patch
  # is the same, so a statistic from 2 of the 9 positions equals the full one
  # only if it is still summed over all 9 uses of each example.
  conv = nnx.Conv(2, 3, (3, 3), padding="CIRCULAR", rngs=nnx.Rngs(0),
                  param_dtype=jnp.float64)
  graphdef, params = nnx.split(conv, nnx.Param)
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (6, 1, 1, 2),
                                         jnp.float64), (6, 3, 3, 2))
  grads = jax.tree.map(lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype)
                                         ).reshape(p.shape), params)
  _, acts = sngd_jax.nnx_capture(nnx.merge(graphdef, params), x)

  def update(stats_positions):
    tx = sngd_jax.scale_by_sngd(**{**FORMULA, "stats_positions": stats_positions})
    return tx.update(grads, tx.init(params), params, activations=acts)[0]

  assert_tree_close(update(2), update(None), **CLOSE)


def test_auto_positions_are_16_under_reduce_and_64_under_expand():
  # 65 positions per example: "auto" must draw exactly a reduce layer's 16
  # and an expand layer's 64 (the draws depend on the step and layer only).
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 65, 3), jnp.float64)
  params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (3, 2),
                                                  jnp.float64)}}
  acts = {"dense": {"inputs": x, "outputs": x @ params["dense"]["kernel"]}}
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)
                                         ).reshape(p.shape), params)

  def update(sharing, stats_positions):
    tx = sngd_jax.scale_by_sngd(**{**FORMULA, "weight_sharing": sharing,
                                   "stats_positions": stats_positions})
    return tx.update(grads, tx.init(params), params, activations=acts)[0]

  for sharing, limit in (("reduce", 16), ("expand", 64)):
    auto = update(sharing, "auto")
    assert_tree_close(auto, update(sharing, limit), **CLOSE)
    for other in (None, limit - 1):
      assert not np.allclose(auto["dense"]["kernel"],
                             update(sharing, other)["dense"]["kernel"])


def test_sampled_positions_are_an_unbiased_estimate_shared_by_inputs_and_outputs():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 2), jnp.float64)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (2, 4), jnp.float64)
  entry = {"inputs": x, "outputs": x @ kernel}
  one = fisher.sampled_positions(entry, 2, fisher.position_seed(0, 3))
  assert one["inputs"].shape == (3, 2, 2)
  np.testing.assert_allclose(one["outputs"], one["inputs"] @ kernel)
  # Each input row is one of its example's positions.
  assert all(any(np.allclose(row, x[n, t]) for t in range(5))
             for n in range(3) for row in np.asarray(one["inputs"][n]))

  def statistic(step):
    sampled = fisher.sampled_positions(
        entry, 2, fisher.position_seed(step, 0))["inputs"]
    return fisher.second_moment(fisher.features(sampled, 3, jnp.float64))

  # Every pair of the 5 positions is drawn as often (400 of 4000, sd 19).
  pairs = jax.vmap(lambda step: fisher.picked_positions(
      fisher.position_seed(step, 0), 5, 2))(jnp.arange(4000))
  counts = collections.Counter(map(tuple, np.asarray(pairs).tolist()))
  assert len(counts) == 10 and all(300 < n < 500 for n in counts.values())
  estimate = jnp.mean(jax.vmap(statistic)(jnp.arange(4000)), axis=0)
  exact = fisher.second_moment(fisher.features(x, 3, jnp.float64))
  np.testing.assert_allclose(estimate, exact, atol=0.03 * np.abs(exact).max())
  # A layer with no more positions than the limit keeps all of them.
  np.testing.assert_array_equal(
      fisher.sampled_positions(entry, 5, fisher.position_seed(0, 3))["inputs"], x)


def test_sampled_positions_keep_the_scanned_marker():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 10, 4))
  entry = {"inputs": x, "outputs": x, fisher.SCANNED: fisher.Scanned()}
  sampled = fisher.sampled_positions(entry, 2, fisher.position_seed(0, 1))
  assert sampled[fisher.SCANNED] == fisher.Scanned()
  assert sampled["inputs"].shape == (3, 2, 4)


def test_a_softmax_layer_under_reduce_scales_its_input_factor_only():
  # The Kronecker block A (x) S times T is (T A) (x) S: scaling both factors
  # would scale the block by T^2.
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5), jnp.float64)
  layer = {"kernel": jax.random.normal(jax.random.PRNGKey(1), (5, 6),
                                       jnp.float64),
           "bias": jnp.zeros(6, jnp.float64)}
  _, entry = sngd_jax.dense(layer, x)
  params, grads = {"head": layer}, jax.tree.map(jnp.ones_like, {"head": layer})

  def stats(sharing):
    tx = sngd_jax.scale_by_sngd(**{**FORMULA, "layer_fisher": "softmax"},
                                weight_sharing=sharing)
    return tx.update(grads, tx.init(params), params,
                     activations={"head": entry})[1].stats["head"]

  reduce, expand = stats("reduce"), stats("expand")
  np.testing.assert_allclose(reduce["input"], 3 * expand["input"], rtol=1e-12)
  np.testing.assert_allclose(reduce["output"], expand["output"], rtol=1e-12)
