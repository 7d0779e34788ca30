"""Transformers: attention projections, tied embeddings, norms over any axis.

Each block is checked in float64 against the local Fisher built from autodiff
Jacobians of the layer's own outputs (the "linear" kind: ``E[J^T J]`` over
every use, an identity output factor), independent of the capture code.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from test_exact_ngd import DAMPING, RELATIVE
from test_flax import captured_gradients, dense_reference, one_update

import sngd_jax


def jacobian_fisher(f, params):
  """``E[J^T J]`` over the rows of ``f(params)`` ``(..., d_out)``, params flattened."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [leaf.size for leaf in leaves]

  def flat_f(theta):
    parts = jnp.split(theta, np.cumsum(sizes)[:-1])
    return f(jax.tree.unflatten(treedef, [
        p.reshape(leaf.shape) for p, leaf in zip(parts, leaves)]))

  theta = jnp.concatenate([leaf.reshape(-1) for leaf in leaves])
  out = flat_f(theta)
  jac = jax.jacobian(flat_f)(theta).reshape(-1, out.shape[-1], theta.size)
  return np.einsum("roa,rob->ab", jac, jac) / jac.shape[0]


def damped_solve(fisher, g):
  dim = fisher.shape[0]
  shift = DAMPING + RELATIVE * np.trace(fisher) / dim
  return np.linalg.solve(fisher + shift * np.eye(dim), g)


def flat(tree):
  return np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(tree)])


class Block(nnx.Module):
  """Pre-LayerNorm decoder block: causal attention and an MLP."""

  def __init__(self, dim, heads, rngs, dtype=jnp.float32):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs, param_dtype=dtype)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs,
                                            param_dtype=dtype)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs, param_dtype=dtype)
    self.up = nnx.Linear(dim, 2 * dim, rngs=rngs, param_dtype=dtype)
    self.down = nnx.Linear(2 * dim, dim, rngs=rngs, param_dtype=dtype)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class MiniGPT(nnx.Module):
  """Decoder-only transformer with tied embeddings (``Embed.attend``)."""

  def __init__(self, vocab=11, dim=16, heads=2, layers=2, context=8, *, rngs,
               dtype=jnp.float32):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs, param_dtype=dtype)
    self.position = nnx.Embed(context, dim, rngs=rngs, param_dtype=dtype)
    self.blocks = nnx.List([Block(dim, heads, rngs, dtype) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs, param_dtype=dtype)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
    for block in self.blocks:
      x = block(x)
    return self.embed.attend(self.norm(x))


def test_minigpt_trains_with_every_parameter_preconditioned():
  model = MiniGPT(rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 9), 0, 11)
  optimizer = nnx.Optimizer(model, sngd_jax.sngd(0.1, momentum=0.9),
                            wrt=nnx.Param)

  def loss_fn(model):
    logits, acts = sngd_jax.nnx_capture(model, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()
    return loss, acts

  @nnx.jit
  def step(model, optimizer):
    (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activations=acts)
    return loss

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no plain-gradient warning, no other
    losses = [float(step(model, optimizer)) for _ in range(30)]
  state = optimizer.opt_state[0]
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  layers, passthrough = sngd_jax.transform.plan_layers(params, "linear", None)
  assert passthrough == []
  # Every layer has its block; alike ones (the projections, the norms) are
  # kept as one stack.
  for layer in layers:
    assert sngd_jax.layer_slice(state.stats, layer.path) is not None
  assert ("blocks/0/attention/key, blocks/0/attention/out, "
          "blocks/0/attention/query, blocks/0/attention/value") in next(
              key for key in state.stats if "attention" in key)
  assert int(state.inverse_faults) == 0
  assert losses[-1] < 0.7 * losses[0]


@pytest.fixture(scope="module")
def attention_case():
  mha = nnx.MultiHeadAttention(2, 6, qkv_features=4, out_features=5,
                               decode=False, rngs=nnx.Rngs(0),
                               param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 6), jnp.float64)
  mask = nnx.make_causal_mask(jnp.ones((3, 4)))
  acts, params, grads = captured_gradients(mha, x, mask=mask)
  return mha, x, mask, params, grads, one_update(params, grads, acts)


@pytest.mark.parametrize("name", ["query", "key", "value", "out"])
def test_attention_projections_get_the_exact_linear_block(attention_case, name):
  mha, x, mask, params, grads, updates = attention_case

  def outputs(sub):  # the projection's own output, as a function of its params
    module = mha if name == "out" else getattr(mha, name)
    graphdef, state = nnx.split(module)
    pure = nnx.to_pure_dict(state)
    if name == "out":  # the attention's output is the out projection's
      pure["out"] = sub
      return nnx.merge(graphdef, nnx.replace_by_pure_dict(state, pure) or state)(
          x, mask=mask)
    nnx.replace_by_pure_dict(state, sub)
    y = nnx.merge(graphdef, state)(x)
    return y.reshape(y.shape[:2] + (-1,))

  fisher = jacobian_fisher(outputs, params[name])
  np.testing.assert_allclose(flat(updates[name]),
                             damped_solve(fisher, flat(grads[name])),
                             rtol=1e-8, atol=1e-12)


def test_linen_attention_is_captured_and_matches_nnx_shapes():
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4,
                                          param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 6), jnp.float64)
  variables = model.init(jax.random.PRNGKey(0), x)

  def loss_fn(params):
    y, acts = sngd_jax.linen_capture(model, {"params": params}, x)
    return jnp.sum(jnp.sin(y)), acts

  (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  assert set(acts) == {"query", "key", "value", "out"}
  assert acts["query"]["outputs"].shape == (3, 4, 4)  # heads x head_dim
  assert acts["out"]["inputs"].shape == (3, 4, 4)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    updates = one_update(variables["params"], grads, acts)
  # Same block as the query projection's Jacobian Fisher.
  fisher = jacobian_fisher(
      lambda sub: nn.DenseGeneral((2, 2), param_dtype=jnp.float64).apply(
          {"params": sub}, x).reshape(3, 4, 4), variables["params"]["query"])
  np.testing.assert_allclose(
      flat(updates["query"]),
      damped_solve(fisher, flat(grads["query"])), rtol=1e-8, atol=1e-12)


class TiedLM(nnx.Module):
  def __init__(self, rngs, untracked=False):
    self.embed = nnx.Embed(6, 4, rngs=rngs, param_dtype=jnp.float64)
    self.mid = nnx.Linear(4, 4, rngs=rngs, param_dtype=jnp.float64)
    self.untracked = untracked

  def hidden(self, tokens):
    return jnp.tanh(self.mid(self.embed(tokens)))

  def __call__(self, tokens):
    h = self.hidden(tokens)
    if self.untracked:  # the table multiplied by hand: capture cannot see it
      return h @ self.embed.embedding[...].T
    return self.embed.attend(h)


def tied_case(untracked):
  model = TiedLM(nnx.Rngs(0), untracked)
  tokens = jnp.array([[0, 1, 1, 2], [2, 3, 0, 0]])  # tokens 4 and 5 unused
  acts, params, grads = captured_gradients(model, tokens)
  return model, tokens, acts, grads, one_update(params, grads, acts)


def test_tied_embedding_block_is_the_sum_of_both_uses():
  model, tokens, acts, grads, updates = tied_case(untracked=False)
  table = model.embed.embedding[...]
  h = model.hidden(tokens)
  lookup = jacobian_fisher(lambda e: e[tokens], table)
  attend = jacobian_fisher(lambda e: h @ e.T, table)
  g = np.asarray(grads["embed"]["embedding"]).reshape(-1)
  np.testing.assert_allclose(
      np.asarray(updates["embed"]["embedding"]).reshape(-1),
      damped_solve(lookup + attend, g), rtol=1e-8, atol=1e-12)
  # The rows never looked up still get a bounded step: their block holds E[h h^T].
  assert np.abs(updates["embed"]["embedding"][4:]).max() < 1e3 * np.abs(g).max()


def test_an_untracked_use_of_a_table_gets_the_plain_gradient():
  model, tokens, acts, grads, updates = tied_case(untracked=True)
  g = np.asarray(grads["embed"]["embedding"])
  assert np.abs(g[4:]).max() > 0  # rows 4, 5: only the hand-made product
  np.testing.assert_allclose(updates["embed"]["embedding"][4:], g[4:])
  lookup = jacobian_fisher(lambda e: e[tokens], model.embed.embedding[...])
  expected = damped_solve(lookup, g.reshape(-1)).reshape(g.shape)
  np.testing.assert_allclose(updates["embed"]["embedding"][:4], expected[:4],
                             rtol=1e-8)


@pytest.mark.parametrize("make", [
    lambda: nnx.BatchNorm(3, axis=1, rngs=nnx.Rngs(0), param_dtype=jnp.float64),
    lambda: nnx.LayerNorm(3, reduction_axes=1, feature_axes=1, rngs=nnx.Rngs(0),
                          param_dtype=jnp.float64),
    lambda: nnx.InstanceNorm(3, feature_axes=1, rngs=nnx.Rngs(0),
                             param_dtype=jnp.float64),
])
def test_norms_over_a_channel_axis_that_is_not_last(make):
  norm = make()
  norm.scale[...] = jnp.array([0.5, 2.0, -1.5])
  norm.bias[...] = jnp.array([0.1, -0.2, 0.3])
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 3, 5), jnp.float64) + 1
  y, acts = sngd_jax.nnx_capture(norm, x)
  xhat = acts["inputs"].materialize()
  assert acts["inputs"].shape == xhat.shape == (4, 5, 3)  # channels last
  # Rebuilds the output: y = scale * xhat + bias along axis 1.
  np.testing.assert_allclose(
      jnp.moveaxis(xhat * norm.scale[...] + norm.bias[...], -1, 1), y,
      atol=1e-12)
  if isinstance(norm, nnx.BatchNorm):  # normalized per channel over batch and L
    np.testing.assert_allclose(jnp.mean(xhat ** 2, axis=(0, 1)), 1.0, atol=1e-4)


def test_linen_layernorm_over_two_feature_axes():
  norm = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1),
                      param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 4), jnp.float64)
  variables = norm.init(jax.random.PRNGKey(1), x)
  params = jax.tree.map(lambda p: p + 0.3, variables["params"])
  y, acts = sngd_jax.linen_capture(norm, {"params": params}, x)
  xhat = acts["inputs"].materialize()
  assert acts["inputs"].shape == xhat.shape == (2, 5, 12)
  np.testing.assert_allclose(
      xhat.reshape(y.shape) * params["scale"] + params["bias"], y,
      atol=1e-12)
  grads = jax.tree.map(jnp.ones_like, params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    one_update(params, grads, acts)


NORMS = {
    "nnx.LayerNorm": lambda dtype: nnx.LayerNorm(6, rngs=nnx.Rngs(0),
                                                 dtype=dtype, param_dtype=dtype),
    "nnx.BatchNorm": lambda dtype: nnx.BatchNorm(
        6, use_running_average=False, rngs=nnx.Rngs(0), dtype=dtype,
        param_dtype=dtype),
    "nnx.RMSNorm": lambda dtype: nnx.RMSNorm(6, rngs=nnx.Rngs(0), dtype=dtype,
                                             param_dtype=dtype),
    "nnx.GroupNorm": lambda dtype: nnx.GroupNorm(
        6, num_groups=2, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype),
    "linen.LayerNorm": lambda dtype: nn.LayerNorm(dtype=dtype,
                                                  param_dtype=dtype),
}


def norm_update(name, scale, dtype):
  """One step on a norm's scale and bias (a fixed gradient) at ``scale``."""
  norm = NORMS[name](dtype)
  x = (2.0 * jax.random.normal(jax.random.PRNGKey(0), (16, 5, 6)) + 1.0)
  x = x.astype(dtype)
  if name.startswith("linen"):
    params = norm.init(jax.random.PRNGKey(1), x)["params"]
    params = {"scale": jnp.full_like(params["scale"], scale),
              "bias": jnp.full_like(params["bias"], 0.5)}
    _, acts = sngd_jax.linen_capture(norm, {"params": params}, x)
  else:
    norm.scale[...] = jnp.full_like(norm.scale[...], scale)
    if getattr(norm, "bias", None) is not None:
      norm.bias[...] = jnp.full_like(norm.bias[...], 0.5)
    _, acts = sngd_jax.nnx_capture(norm, x)
    params = nnx.to_pure_dict(nnx.state(norm, nnx.Param))
  grads = jax.tree.map(
      lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape).astype(dtype),
      params)
  tx = sngd_jax.scale_by_sngd()
  return jax.tree.map(lambda u: np.asarray(u, np.float64),
                      tx.update(grads, tx.init(params), params,
                                activations=acts)[0]), acts


@pytest.mark.parametrize("name", sorted(NORMS))
def test_a_norms_block_does_not_depend_on_its_scale(name):
  # The block is built from xhat, the normalized input: read back from the
  # output as (y - bias) / scale it was lost at scale 0 (zero-init residual
  # branches, adaLN-zero) and in bf16 at scale 1e-3.
  expected, _ = norm_update(name, 1.0, jnp.float32)
  at_zero, _ = norm_update(name, 0.0, jnp.float32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               at_zero, expected)
  tiny, acts = norm_update(name, 1e-3, jnp.bfloat16)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05,
                                                       atol=0.02),
               tiny, expected)
  if name != "nnx.GroupNorm":  # its xhat is normalized over groups, not C
    xhat = np.asarray(acts["inputs"].materialize(), np.float64)
    np.testing.assert_allclose(np.mean(xhat ** 2), 1.0, atol=0.02)


def test_alike_linen_norms_have_one_structure_so_their_statistics_batch():
  class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.LayerNorm()(nn.Dense(6)(nn.LayerNorm()(x)))

  x = jnp.ones((4, 6))
  variables = Two().init(jax.random.PRNGKey(0), x)
  _, acts = sngd_jax.linen_capture(Two(), variables, x)
  assert (jax.tree.structure(acts["LayerNorm_0"])
          == jax.tree.structure(acts["LayerNorm_1"]))


def test_capturing_a_batch_norm_moves_its_running_statistics_once():
  norm, plain = NORMS["nnx.BatchNorm"](jnp.float32), NORMS["nnx.BatchNorm"](
      jnp.float32)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 6)) + 3.0
  _, acts = sngd_jax.nnx_capture(norm, x)
  plain(x)
  acts["inputs"].materialize()
  np.testing.assert_array_equal(norm.mean[...], plain.mean[...])
  np.testing.assert_array_equal(norm.var[...], plain.var[...])


class Tagger(nnx.Module):
  """A per-position model: padding changes no real position's output."""

  def __init__(self, rngs, vocab=7):
    f64 = dict(rngs=rngs, param_dtype=jnp.float64)
    self.embed = nnx.Embed(vocab, 4, **f64)
    self.norm = nnx.LayerNorm(4, **f64)
    self.hidden = nnx.Linear(4, 5, **f64)
    self.head = nnx.Linear(5, vocab, **f64)

  def __call__(self, tokens):
    return self.head(jnp.tanh(self.hidden(self.norm(self.embed(tokens)))))


def tagger_update(tokens, mask, mask_stats=True, **options):
  """One step on a masked-mean cross entropy (next token = the same token)."""
  model = Tagger(nnx.Rngs(0))

  def loss_fn(model):
    logits, acts = sngd_jax.nnx_capture(
        model, tokens, position_mask=mask if mask_stats else None)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return jnp.sum(losses * mask) / jnp.sum(mask), acts

  (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  grads = nnx.to_pure_dict(grads)
  tx = sngd_jax.scale_by_sngd(**options)
  return tx.update(grads, tx.init(params), params, activations=acts)[0], acts


@pytest.mark.parametrize("options", [
    {"weight_sharing": "expand", "nystrom": None},
    {"weight_sharing": "reduce", "nystrom": None},
    {"layer_fisher": {"hidden": "tanh", "head": "softmax"}},
    {"nystrom": sngd_jax.Nystrom(rank=3, min_dim=4), "stats_positions": 3},
], ids=["expand", "reduce", "per-unit and softmax", "nystrom, sampled"])
def test_a_padded_batch_with_its_mask_steps_as_the_unpadded_one(options):
  # Each example repeats one token, so any sample of its real positions is
  # all of them; the padding (token 6) would change every block.
  real, padded = 5, 9
  tokens = jnp.repeat(jnp.array([[1], [2], [3], [1]]), real, axis=1)
  pad = jnp.full((4, padded - real), 6)
  mask = jnp.arange(padded) < real
  mask = jnp.broadcast_to(mask, (4, padded)).astype(jnp.float64)
  expected, _ = tagger_update(tokens, jnp.ones((4, real)), **options)
  got, acts = tagger_update(jnp.concatenate([tokens, pad], 1), mask, **options)
  assert all(acts[name]["weights"].shape == (4, padded, 1)
             for name in ("embed", "norm", "hidden", "head"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                       atol=1e-12),
               got, expected)
  unmasked, _ = tagger_update(jnp.concatenate([tokens, pad], 1), mask,
                              mask_stats=False, **options)
  assert not np.allclose(flat(unmasked), flat(expected), rtol=1e-3)


def test_a_mask_whose_shape_fits_no_position_is_refused():
  layer = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
  _, entry = sngd_jax.dense(layer, jnp.ones((4, 5, 3)))
  entry["weights"] = jnp.ones((4, 5))
  tx = sngd_jax.scale_by_sngd()
  with pytest.raises(ValueError, match=r"activations\['dense'\]\['weights'\] "
                     r"has shape \(4, 5\); expected \(4, 5, 1\)"):
    tx.update({"dense": layer}, tx.init({"dense": layer}), {"dense": layer},
              activations={"dense": entry})


class Rematted(nnx.Module):
  """A layer called through ``nnx.remat`` (or directly), and a plain head."""

  def __init__(self, rngs, remat=True):
    self.inner = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float64)
    self.head = nnx.Linear(4, 2, rngs=rngs, param_dtype=jnp.float64)
    self.remat = remat

  def __call__(self, x):
    call = nnx.remat(_call) if self.remat else _call
    return self.head(jnp.tanh(call(self.inner, x)))


def _call(layer, x):
  return layer(x)


_REMATTED_BEFORE_CAPTURE = nnx.remat(_call)


class RemattedAtImport(Rematted):
  """``nnx.remat`` applied once, outside any capture (a decorator at import)."""

  def __call__(self, x):
    return self.head(jnp.tanh(_REMATTED_BEFORE_CAPTURE(self.inner, x)))


def test_a_layer_inside_nnx_remat_gets_the_update_it_gets_without_remat():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
  updates = {}
  for remat in (False, True):
    acts, params, grads = captured_gradients(Rematted(nnx.Rngs(0), remat), x)
    assert set(acts) == {"inner", "head"}
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no plain-gradient warning
      updates[remat] = one_update(params, grads, acts)
  np.testing.assert_allclose(updates[True]["inner"]["kernel"],
                             updates[False]["inner"]["kernel"], rtol=1e-12)
  g = grads["inner"]
  np.testing.assert_allclose(
      np.concatenate([updates[True]["inner"]["kernel"],
                      updates[True]["inner"]["bias"][None]]),
      dense_reference(x, g["kernel"], g["bias"]), rtol=1e-9)


def test_linen_remat_layers_are_captured_under_their_parameter_paths():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.remat(nn.Dense)(4, param_dtype=jnp.float64)(x)

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, param_dtype=jnp.float64)(jnp.tanh(Block()(x)))

  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
  model = Model()
  params = model.init(jax.random.PRNGKey(0), x)["params"]

  def loss_fn(params):
    y, acts = sngd_jax.linen_capture(model, {"params": params}, x)
    return jnp.sum(jnp.sin(y)), acts

  (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    updates = one_update(params, grads, acts)
  update = updates["Block_0"]["CheckpointDense_0"]
  g = grads["Block_0"]["CheckpointDense_0"]
  np.testing.assert_allclose(
      np.concatenate([update["kernel"], update["bias"][None]]),
      dense_reference(x, g["kernel"], g["bias"]), rtol=1e-9)


def test_a_remat_made_before_capture_gets_the_plain_gradient_and_is_named():
  model = RemattedAtImport(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
  acts, params, grads = captured_gradients(model, x)
  assert set(acts) == {"head"}  # its records live in the checkpoint's trace
  with pytest.warns(UserWarning, match=r"'inner/bias', 'inner/kernel'"):
    updates = one_update(params, grads, acts)
  np.testing.assert_array_equal(updates["inner"]["kernel"],
                                grads["inner"]["kernel"])
  assert not np.allclose(updates["head"]["kernel"], grads["head"]["kernel"])
