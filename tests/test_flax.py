"""Flax NNX and linen models train with SNGD without rewriting them."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from helpers import assert_tree_close
from test_exact_ngd import FORMULA, damp, with_ones

import sngd_jax
from sngd_jax import fisher

# Every use a row of one mean: these tests check the rows that capture gives.
EXACT = dict(FORMULA, weight_sharing="expand")


def one_update(params, grads, acts, **options):
  tx = sngd_jax.scale_by_sngd(**{**EXACT, **options})
  return tx.update(grads, tx.init(params), params, activations=acts)[0]


def captured_gradients(model, *args, **kwargs):
  """``(acts, params, grads)`` of ``sum(sin(model(*args)))``, params and grads pure."""

  def loss_fn(model):
    y, acts = sngd_jax.nnx_capture(model, *args, **kwargs)
    return jnp.sum(jnp.sin(y)), acts

  (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return (acts, nnx.as_pure(nnx.state(model, nnx.Param)),
          nnx.as_pure(nnx.state(grads, nnx.Param)))


def dense_reference(x, g_kernel, g_bias):
  xt = with_ones(np.asarray(x).reshape(-1, x.shape[-1]))
  g = np.concatenate([np.asarray(g_kernel).reshape(xt.shape[1] - 1, -1),
                      np.asarray(g_bias)[None]])
  return np.linalg.solve(damp(xt.T @ xt / xt.shape[0]), g)


def assert_captured_patches_reproduce(conv, x):
  """The captured patches (built lazily) times the kernel give the layer's
  output, and the statistics' sampled positions gather only their windows:
  the full im2col's patches at the positions they keep. Returns the patches."""
  y, acts = sngd_jax.nnx_capture(conv, x)
  patches = acts["inputs"].materialize()
  assert acts["inputs"].shape == patches.shape
  features = conv.kernel.shape[-1]
  np.testing.assert_allclose(
      patches @ conv.kernel[...].reshape(-1, features) + conv.bias[...], y,
      atol=1e-12)
  seed = fisher.position_seed(3, 2)
  sampled = fisher.sampled_positions(acts, 5, seed)
  kept = fisher.picked_positions(seed, patches[0, ..., 0].size, 5)
  np.testing.assert_array_equal(
      sampled["inputs"], patches.reshape(2, -1, patches.shape[-1])[:, kept])
  np.testing.assert_array_equal(sampled["outputs"],
                                y.reshape(2, -1, features)[:, kept])
  return patches


@pytest.mark.parametrize("strides,padding,dilation,input_dilation", [
    (1, "SAME", 1, 1), (2, "VALID", 1, 1), ((2, 1), [(1, 2), (0, 1)], 1, 1),
    (1, "SAME", 2, 1), (1, 1, (1, 2), 1), (1, "CIRCULAR", 1, 1),
    (2, "CIRCULAR", (2, 1), 1), (1, "REFLECT", 1, 1),
    # Input dilation (Flax allows it with explicit pads only).
    ((2, 1), [(1, 2), (0, 1)], 1, 2), (1, 1, (1, 2), (2, 1)),
    (1, [(0, 0), (2, 1)], 1, (1, 3))])
def test_conv_patches_reproduce_the_convolution(strides, padding, dilation,
                                                input_dilation):
  conv = nnx.Conv(3, 5, (3, 2), strides=strides, padding=padding,
                  kernel_dilation=dilation, input_dilation=input_dilation,
                  rngs=nnx.Rngs(0),
                  param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 8, 3), jnp.float64)
  patches = assert_captured_patches_reproduce(conv, x)
  np.testing.assert_array_equal(sngd_jax.conv_patches(conv, x), patches)


# ConvTranspose: a stride-1 convolution of the input dilated by the strides.
@pytest.mark.parametrize("strides,padding,dilation", [
    (2, "SAME", 1), (2, "VALID", 1), ((2, 3), "SAME", 1), (1, "SAME", 2),
    ((3, 1), "VALID", (1, 2)), (2, [(1, 2), (0, 1)], 1), (2, 1, 1)])
def test_conv_transpose_patches_reproduce_it(strides, padding, dilation):
  conv = nnx.ConvTranspose(3, 5, (3, 2), strides=strides, padding=padding,
                           kernel_dilation=dilation, rngs=nnx.Rngs(0),
                           param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4, 3), jnp.float64)
  assert_captured_patches_reproduce(conv, x)


class TwoLinear(nnx.Module):
  """``x A B + offset`` with two bias-free dense layers: nnx.LoRA's reference."""

  def __init__(self, a, b, offset):
    self.a = nnx.Linear(*a.shape, use_bias=False, rngs=nnx.Rngs(0),
                        param_dtype=jnp.float64)
    self.b = nnx.Linear(*b.shape, use_bias=False, rngs=nnx.Rngs(0),
                        param_dtype=jnp.float64)
    self.a.kernel[...], self.b.kernel[...] = a, b
    self.offset = nnx.Variable(offset)  # not a Param: no gradient

  def __call__(self, x):
    return self.b(self.a(x)) + self.offset[...]


@pytest.mark.parametrize("inside_linear", [False, True])
def test_lora_factors_are_two_dense_layers(inside_linear):
  rngs = nnx.Rngs(0)
  if inside_linear:  # LoRALinear: a Linear (itself a layer) holding a LoRA
    model = nnx.LoRALinear(6, 4, lora_rank=2, rngs=rngs, param_dtype=jnp.float64,
                           lora_param_dtype=jnp.float64)
    lora = model.lora
  else:
    model = lora = nnx.LoRA(6, 2, 4, rngs=rngs, param_dtype=jnp.float64)
  lora.lora_b[...] = jax.random.normal(jax.random.PRNGKey(2), (2, 4), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 6), jnp.float64)
  acts, params, grads = captured_gradients(model, x)
  updates = one_update(params, grads, acts)
  base = (x @ model.kernel[...] + model.bias[...] if inside_linear
          else jnp.zeros((16, 4), jnp.float64))
  reference = TwoLinear(lora.lora_a[...], lora.lora_b[...], base)
  ref_acts, ref_params, ref_grads = captured_gradients(reference, x)
  expected = one_update(ref_params, ref_grads, ref_acts)
  got = updates["lora"] if inside_linear else updates
  np.testing.assert_allclose(got["lora_a"], expected["a"]["kernel"], rtol=1e-10)
  np.testing.assert_allclose(got["lora_b"], expected["b"]["kernel"], rtol=1e-10)
  # The factors' blocks are their own, not the plain gradient.
  assert not np.allclose(got["lora_a"], grads["lora"]["lora_a"] if inside_linear
                         else grads["lora_a"])
  if inside_linear:  # fine-tuning the LoRA alone: the Linear is not in params
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # its entry is unused, without a warning
      alone = one_update({"lora": params["lora"]}, {"lora": grads["lora"]}, acts)
    np.testing.assert_allclose(alone["lora"]["lora_a"], got["lora_a"], rtol=1e-12)
    np.testing.assert_allclose(alone["lora"]["lora_b"], got["lora_b"], rtol=1e-12)


def test_conv_1d_and_causal():
  conv = nnx.Conv(2, 4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  x = jnp.ones((3, 10, 2), jnp.float64)
  np.testing.assert_allclose(
      sngd_jax.conv_patches(conv, x) @ conv.kernel[...].reshape(-1, 4)
      + conv.bias[...], conv(x), atol=1e-12)
  causal = nnx.Conv(2, 4, 3, padding="CAUSAL", kernel_dilation=2,
                    rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  np.testing.assert_allclose(
      sngd_jax.conv_patches(causal, x) @ causal.kernel[...].reshape(-1, 4)
      + causal.bias[...], causal(x), atol=1e-12)

  dilated = nnx.Conv(2, 4, 3, padding=2, input_dilation=2,
                     rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  np.testing.assert_allclose(
      sngd_jax.conv_patches(dilated, x) @ dilated.kernel[...].reshape(-1, 4)
      + dilated.bias[...], dilated(x), atol=1e-12)


@pytest.mark.parametrize("groups", [2, 6])  # 6: depthwise
def test_grouped_conv_shares_one_block_over_its_groups(groups):
  conv = nnx.Conv(6, 12, (3, 3), feature_group_count=groups, padding="SAME",
                  rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 5, 5, 6), jnp.float64)
  patches = sngd_jax.conv_patches(conv, x)
  rows = 9 * 6 // groups
  assert patches.shape == (4, 5, 5, groups, rows)
  kernel = conv.kernel[...].reshape(rows, groups, 12 // groups)
  y = jnp.einsum("...gr,rgo->...go", patches, kernel).reshape(4, 5, 5, 12)
  np.testing.assert_allclose(y + conv.bias[...], conv(x), atol=1e-12)

  acts, params, grads = captured_gradients(conv, x)
  updates = one_update(params, grads, acts)
  # One block E[x~ x~^T] over every position and every group's patch.
  expected = dense_reference(patches, grads["kernel"], grads["bias"])
  np.testing.assert_allclose(updates["kernel"].reshape(rows, 12),
                             expected[:-1], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(updates["bias"], expected[-1], rtol=1e-9)
  with pytest.raises(ValueError, match="needs 'outputs'"):
    one_update(params, grads, acts, layer_fisher="relu")


class CNN(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs, param_dtype=jnp.float64)
    self.norm = nnx.BatchNorm(4, rngs=rngs, param_dtype=jnp.float64)
    self.embed = nnx.Embed(6, 4, rngs=rngs, param_dtype=jnp.float64)
    self.head = nnx.Linear(4 * 5 * 5, 3, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, images, tokens):
    h = nnx.relu(self.norm(self.conv(images)))
    h = h + self.embed(tokens)[:, None, None, :]
    return self.head(h.reshape(h.shape[0], -1))


def cnn_batch():
  images = jax.random.normal(jax.random.PRNGKey(2), (8, 5, 5, 1), jnp.float64)
  tokens = jnp.array([0, 1, 1, 2, 5, 5, 5, 3])
  labels = jnp.arange(8) % 3
  return images, tokens, labels


def cnn_loss(model, images, tokens, labels):
  logits, acts = sngd_jax.nnx_capture(model, images, tokens)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, acts


def test_nnx_layers_get_their_local_fisher():
  model = CNN(nnx.Rngs(0))
  images, tokens, labels = cnn_batch()
  (_, acts), grads = nnx.value_and_grad(cnn_loss, has_aux=True)(
      model, images, tokens, labels)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(nnx.state(grads, nnx.Param))
  assert set(acts) == {"conv", "norm", "embed", "head"}
  updates = one_update(params, grads, acts)

  # Convolution: the linear block over im2col patches.
  patches = sngd_jax.conv_patches(model.conv, images)
  expected = dense_reference(patches, grads["conv"]["kernel"],
                             grads["conv"]["bias"])
  np.testing.assert_allclose(updates["conv"]["kernel"].reshape(-1, 4),
                             expected[:-1], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(updates["conv"]["bias"], expected[-1], rtol=1e-9)

  # Batch norm: a 2x2 block per channel over [xhat_c, 1].
  conv_out = model.conv(images)
  mean = conv_out.mean((0, 1, 2))
  var = conv_out.var((0, 1, 2))
  xhat = np.asarray((conv_out - mean) / np.sqrt(var + model.norm.epsilon)).reshape(-1, 4)
  blocks = []
  for c in range(4):
    z = np.stack([xhat[:, c], np.ones(len(xhat))], axis=1)
    blocks.append(z.T @ z / len(z))
  trace = sum(np.trace(b) for b in blocks)
  for c, block in enumerate(blocks):
    g = np.array([grads["norm"]["scale"][c], grads["norm"]["bias"][c]])
    expected = np.linalg.solve(damp(block, trace, 8), g)
    np.testing.assert_allclose(
        [updates["norm"]["scale"][c], updates["norm"]["bias"][c]], expected,
        rtol=1e-7)

  # Embedding: each row scaled by 1 / (frequency + damping).
  freq = np.bincount(np.asarray(tokens), minlength=6) / len(tokens)
  shift = FORMULA["damping"] + FORMULA["relative_damping"] * freq.sum() / 6
  np.testing.assert_allclose(updates["embed"]["embedding"],
                             grads["embed"]["embedding"] / (freq + shift)[:, None],
                             rtol=1e-10)

  # Dense head on the flattened features.
  np.testing.assert_allclose(
      np.concatenate([updates["head"]["kernel"], updates["head"]["bias"][None]]),
      dense_reference(acts["head"]["inputs"], grads["head"]["kernel"],
                      grads["head"]["bias"]), rtol=1e-9, atol=1e-12)


def test_layer_norm_gets_a_block_per_channel_over_xhat_and_one():
  # Unlike batch norm's, a layer norm's xhat has a nonzero mean per channel
  # over the batch, so each block's off-diagonal E[xhat_c] counts.
  norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  x = (jax.random.normal(jax.random.PRNGKey(1), (6, 3), jnp.float64)
       * jnp.array([1.0, 2.0, 3.0]) + jnp.array([0.0, 2.0, -1.0]))
  acts, params, grads = captured_gradients(norm, x)
  updates = one_update(params, grads, acts)
  x = np.asarray(x)
  centred = x - x.mean(-1, keepdims=True)
  xhat = centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + norm.epsilon)
  blocks = [np.cov(np.stack([xhat[:, c], np.ones(6)]), bias=True)
            + np.outer([xhat[:, c].mean(), 1], [xhat[:, c].mean(), 1])
            for c in range(3)]
  assert min(abs(b[0, 1]) for b in blocks) > 0.1  # the means matter here
  trace = sum(np.trace(b) for b in blocks)
  for c, block in enumerate(blocks):
    g = np.array([grads["scale"][c], grads["bias"][c]])
    np.testing.assert_allclose(
        [updates["scale"][c], updates["bias"][c]],
        np.linalg.solve(damp(block, trace, 6), g), rtol=1e-7)


def test_einsum_dense_maps_get_the_linear_block():
  rngs = nnx.Rngs(0)
  dense = nnx.Einsum("btd,df->btf", (3, 4), (4,), rngs=rngs,
                     param_dtype=jnp.float64)
  # Several output axes and no bias: the kernel (4, 2, 2) alone does not say
  # which axes are outputs.
  heads = nnx.Einsum("btd,dhk->bthk", (4, 2, 2), rngs=rngs,
                     param_dtype=jnp.float64)
  model = nnx.Sequential(dense, heads)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3), jnp.float64)
  acts, params, grads = captured_gradients(model, x)
  with pytest.raises(ValueError, match=r"layers/1.*output_axes"):
    one_update(params, grads, acts)
  updates = one_update(params, grads, acts, output_axes={"layers/1": 2})
  layer = updates["layers"][0]
  np.testing.assert_allclose(
      np.concatenate([layer["kernel"], layer["bias"][None]]),
      dense_reference(x, grads["layers"][0]["kernel"], grads["layers"][0]["bias"]),
      rtol=1e-9, atol=1e-12)
  inputs = np.asarray(acts["layers"][1]["inputs"]).reshape(-1, 4)
  g = np.asarray(grads["layers"][1]["kernel"]).reshape(4, 4)
  np.testing.assert_allclose(
      np.asarray(updates["layers"][1]["kernel"]).reshape(4, 4),
      np.linalg.solve(damp(inputs.T @ inputs / len(inputs)), g), rtol=1e-9)

  linen_dense = nn.Einsum((3, 4), "...d,df->...f", param_dtype=jnp.float64)
  variables = linen_dense.init(jax.random.PRNGKey(0), x)
  _, linen_acts = sngd_jax.linen_capture(linen_dense, variables, x)
  np.testing.assert_allclose(linen_acts["inputs"], x)


class Shared(nnx.Module):
  """A nested block whose layer is used twice, inside an nnx.List."""

  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs, param_dtype=jnp.float64)
                            for _ in range(2)])
    self.norm = nnx.LayerNorm(3, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    first = self.blocks[0]
    return self.norm(self.blocks[1](nnx.tanh(first(nnx.tanh(first(x))))))


def test_module_used_twice_averages_over_both_uses_and_paths_nest():
  model = Shared(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
  calls = []
  original = nnx.Linear.__call__
  try:
    nnx.Linear.__call__ = lambda self, x: (calls.append(1), original(self, x))[1]
    (_, acts), grads = nnx.value_and_grad(
        lambda m: (lambda y, a: (jnp.sum(y ** 2), a))(*sngd_jax.nnx_capture(m, x)),
        has_aux=True)(model)
  finally:
    nnx.Linear.__call__ = original
  assert len(calls) == 3  # one forward pass: three Linear calls, not six
  assert sorted(acts) == ["blocks", "norm"]
  assert sorted(acts["blocks"]) == [0, 1]
  # Both uses of each example, along its positions axis: (batch, uses, d).
  assert acts["blocks"][0]["inputs"].shape == (5, 2, 3)
  first_in = x
  second_in = jnp.tanh(model.blocks[0](x))
  np.testing.assert_allclose(acts["blocks"][0]["inputs"],
                             jnp.stack([first_in, second_in], axis=1), atol=1e-12)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.as_pure(nnx.state(grads, nnx.Param))
  updates = one_update(params, grads, acts)
  expected = dense_reference(acts["blocks"][0]["inputs"],
                             grads["blocks"][0]["kernel"],
                             grads["blocks"][0]["bias"])
  np.testing.assert_allclose(updates["blocks"][0]["kernel"], expected[:-1],
                             rtol=1e-9, atol=1e-12)


def test_captured_activations_of_a_frozen_layer_are_unused():
  # A frozen layer (an nnx.Optimizer's wrt filter leaves its params out) has
  # an entry from the capture; the same entry built by hand would be a
  # misspelt path, and raises.
  model = Shared(nnx.Rngs(0))
  _, acts = sngd_jax.nnx_capture(model, jnp.ones((2, 3), jnp.float64))
  trained = {"blocks": nnx.as_pure(nnx.state(model, nnx.Param))["blocks"]}
  grads = jax.tree.map(jnp.ones_like, trained)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no plain-gradient warning either
    with_frozen = one_update(trained, grads, acts)
  assert_tree_close(with_frozen, one_update(
      trained, grads, {"blocks": acts["blocks"]}), rtol=1e-12)
  by_hand = {key: value for key, value in acts["norm"].items()
             if key != fisher.CAPTURED}
  with pytest.raises(ValueError, match=r"\['norm'\] where the params"):
    one_update(trained, grads, {**acts, "norm": by_hand})


def test_nnx_cnn_trains_under_nnx_jit():
  model = CNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sngd_jax.sngd(0.1, momentum=0.9,
                                                 inverse_every=5), wrt=nnx.Param)
  images, tokens, labels = cnn_batch()

  @nnx.jit
  def step(model, optimizer):
    (loss, acts), grads = nnx.value_and_grad(cnn_loss, has_aux=True)(
        model, images, tokens, labels)
    optimizer.update(model, grads, activations=acts)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.2 * losses[0], losses


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.LayerNorm()(nn.Conv(4, (3, 3), strides=2)(x)))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_linen_cnn_trains_and_activations_mirror_params():
  model = LinenCNN()
  images, _, labels = cnn_batch()
  images = images.astype(jnp.float32)
  variables = model.init(jax.random.PRNGKey(0), images)
  params = variables["params"]
  tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=5)
  state = tx.init(params)

  def loss_fn(params):
    logits, acts = sngd_jax.linen_capture(model, {"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean(), acts

  @jax.jit
  def step(params, state):
    (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss, acts

  _, _, _, acts = step(params, state)
  assert sorted(acts) == ["Conv_0", "Dense_0", "LayerNorm_0"]
  assert acts["Conv_0"]["inputs"].shape == (8, 3, 3, 9)
  losses = []
  for _ in range(30):
    params, state, loss, _ = step(params, state)
    losses.append(float(loss))
  assert losses[-1] < 0.2 * losses[0], losses
  assert int(state[0].inverse_faults) == 0


def test_pure_jax_dense_helper_matches_manual_entries():
  layer = {"kernel": jnp.ones((3, 2)), "bias": jnp.arange(2.0)}
  x = jnp.arange(12.0).reshape(4, 3)
  h, entry = sngd_jax.dense(layer, x)
  np.testing.assert_allclose(h, x @ layer["kernel"] + layer["bias"])
  np.testing.assert_allclose(entry["outputs"], h)
  np.testing.assert_allclose(entry["inputs"], x)


class Unrolled(nnx.Module):
  """A cell called once per time step in Python: the reference for nnx.RNN."""

  def __init__(self, cell):
    self.cell = cell

  def __call__(self, x):
    carry = self.cell.initialize_carry(x[:, 0].shape, nnx.Rngs(0))
    for t in range(x.shape[1]):
      carry, y = self.cell(carry, x[:, t])
    return y


def assert_same_rows_per_step(scanned, unrolled, steps):
  """Scanned and unrolled records alike are (batch, steps, d); the scanned
  ones are marked as such (weight_sharing "auto" expands them)."""
  is_entry = lambda x: isinstance(x, dict) and "inputs" in x
  entries = jax.tree.leaves(scanned, is_leaf=is_entry)
  assert entries and all(
      isinstance(e.get(fisher.SCANNED), fisher.Scanned) for e in entries)
  scanned = jax.tree.map(
      lambda entry: {k: v for k, v in entry.items() if k != fisher.SCANNED},
      scanned, is_leaf=is_entry)
  assert jax.tree.structure(scanned) == jax.tree.structure(unrolled)
  for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(unrolled)):
    assert a.shape[1] == steps and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell_class", [nnx.LSTMCell, nnx.GRUCell,
                                        nnx.SimpleCell])
def test_nnx_rnn_cells_are_captured_inside_the_scan(cell_class):
  cell = cell_class(3, 5, rngs=nnx.Rngs(0), dtype=jnp.float64,
                    param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 3), jnp.float64)
  rnn = nnx.RNN(cell)
  y, acts = nnx.jit(sngd_jax.nnx_capture)(rnn, x)
  y_ref, ref = sngd_jax.nnx_capture(Unrolled(cell), x)
  np.testing.assert_allclose(y[:, -1], y_ref, rtol=1e-12)
  assert set(acts["cell"]) == {path[0] for path, m in nnx.iter_modules(cell)
                               if isinstance(m, nnx.Linear)}
  assert_same_rows_per_step(acts, ref, steps=6)


# OptimizedLSTMCell: the LSTMCell's parameters, its gates' kernels made by
# DenseParams modules and applied concatenated; captured as the same layers.
@pytest.mark.parametrize("cell_class", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_linen_rnn_and_scan_cells_are_captured_inside_the_scan(cell_class):
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 3), jnp.float64)

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.RNN(cell_class(5, param_dtype=jnp.float64, name="LSTMCell_0"))(x)
      return nn.Dense(2, param_dtype=jnp.float64)(h[:, -1])

  class Python(nn.Module):  # The same parameters, an LSTMCell unrolled.
    @nn.compact
    def __call__(self, x):
      cell = nn.LSTMCell(5, param_dtype=jnp.float64)
      carry = cell.initialize_carry(jax.random.PRNGKey(0), x[:, 0].shape)
      for t in range(x.shape[1]):
        carry, h = cell(carry, x[:, t])
      return nn.Dense(2, param_dtype=jnp.float64)(h)

  variables = Scanned().init(jax.random.PRNGKey(0), x)
  y, acts = jax.jit(lambda v, x: sngd_jax.linen_capture(Scanned(), v, x))(
      variables, x)
  y_ref, ref = sngd_jax.linen_capture(Python(), variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-12)
  assert_same_rows_per_step(acts["LSTMCell_0"], ref["LSTMCell_0"], steps=6)
  np.testing.assert_allclose(acts["Dense_0"]["inputs"],
                             ref["Dense_0"]["inputs"], rtol=1e-12)


SIGMOID, TANH = 1 / 16, 1.0  # f'(0)^2
CELL_SLOPES = [  # (cell, {layer: its slopes}); fused layers average their gates
    (nn.GRUCell(4), dict.fromkeys(["ir", "iz", "hr", "hz"], SIGMOID)
     | dict.fromkeys(["in", "hn"], TANH)),
    (nn.GRUCell(4, gate_fn=nn.hard_sigmoid, activation_fn=nn.relu),
     dict.fromkeys(["ir", "iz", "hr", "hz"], 1 / 36)  # its slope at 0 is 1/6
     | dict.fromkeys(["in", "hn"], 1.0)),  # a ReLU's slope at 0 is 0: unweighted
    (nn.SimpleCell(4, activation_fn=nn.softmax),  # over the last axis: runs
     dict.fromkeys(["i", "h"], 1.0)),
    (nn.LSTMCell(4), dict.fromkeys(["ii", "if", "io", "hi", "hf", "ho"], SIGMOID)
     | dict.fromkeys(["ig", "hg"], TANH)),
    (nn.OptimizedLSTMCell(4), dict.fromkeys(["ii", "if", "io", "hi", "hf", "ho"],
                                            SIGMOID)
     | dict.fromkeys(["ig", "hg"], TANH)),
    (nn.MGUCell(4), dict.fromkeys(["if", "hf"], SIGMOID)
     | dict.fromkeys(["in", "hn"], TANH)),
    (nn.SimpleCell(4), dict.fromkeys(["i", "h"], TANH)),
    ("nnx.GRUCell", dict.fromkeys(["dense_i", "dense_h"],
                                  (2 * SIGMOID + TANH) / 3)),
    ("nnx.LSTMCell", dict.fromkeys(["ii", "if_", "io", "hi", "hf", "ho"], SIGMOID)
     | dict.fromkeys(["ig", "hg"], TANH)),
    ("nnx.OptimizedLSTMCell", dict.fromkeys(["dense_i", "dense_h"],
                                            (3 * SIGMOID + TANH) / 4)),
    ("nnx.SimpleCell", dict.fromkeys(["dense_i", "dense_h"], TANH)),
]


@pytest.mark.parametrize("cell,expected", CELL_SLOPES, ids=[
    "GRUCell", "GRUCell-hard_sigmoid-relu", "SimpleCell-softmax", "LSTMCell",
    "OptimizedLSTMCell",
    "MGUCell", "SimpleCell", "nnx.GRUCell", "nnx.LSTMCell",
    "nnx.OptimizedLSTMCell", "nnx.SimpleCell"])
def test_a_cells_layers_record_the_slopes_of_their_gates(cell, expected):
  """Every layer of a cell, and only those, records the squared slope at 0 of
  the function its outputs go into (a sigmoid 1/16, a tanh 1), for every row
  of its inputs; a layer feeding several gates (NNX's fused ones) the mean."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 7, 3)), jnp.float32)

  def rows_and_slopes(acts):
    return {name: (entry["inputs"].shape[:-1], np.unique(entry[fisher.SLOPES]))
            for name, entry in acts.items()}

  if isinstance(cell, str):
    cell = getattr(nnx, cell[4:])(3, 4, rngs=nnx.Rngs(0))
    _, acts = sngd_jax.nnx_capture(nnx.RNN(cell), x)
    acts = acts["cell"]
  else:
    model = nn.Sequential([nn.RNN(cell), nn.Dense(2)])
    variables = model.init(jax.random.PRNGKey(0), x)
    _, acts = sngd_jax.linen_capture(model, variables, x)
    assert fisher.SLOPES not in acts["layers_1"]  # the head is no cell's
    acts = acts["layers_0"]["cell"]
  got = rows_and_slopes(acts)
  assert set(got) == set(expected)
  for name, (shape, values) in got.items():
    assert shape == (6, 7) and values.shape == (1,), name
    np.testing.assert_allclose(values[0], expected[name], rtol=1e-6,
                               err_msg=name)


def test_slopes_weigh_the_rows_of_the_linear_and_nystrom_blocks():
  """``E[s x~ x~^T]``: the full block, and the Nystrom block's columns and
  diagonal, against numpy."""
  rng = np.random.default_rng(0)
  x, s = rng.normal(size=(2, 5, 6)), rng.uniform(0.01, 0.2, size=(2, 5, 1))
  xt = with_ones(x.reshape(-1, 6)) * np.sqrt(s.reshape(-1, 1))
  expected = xt.T @ xt / 10
  entry = {"inputs": jnp.asarray(x), fisher.SLOPES: jnp.asarray(s)}
  np.testing.assert_allclose(fisher.Linear(7).statistic(entry, jnp.float64),
                             expected, rtol=1e-12)
  nystrom = fisher.NystromLinear.for_width(7, 3, bias=True)
  stats = nystrom.statistic(entry, jnp.float64)
  np.testing.assert_allclose(stats["columns"],
                             expected[:, list(nystrom.columns)], rtol=1e-12)
  np.testing.assert_allclose(stats["diagonal"], np.diag(expected), rtol=1e-12)


class Recurrent(nnx.Module):
  """An NNX LSTM over time (``nnx.RNN``, a scan) and a linear head."""

  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.LSTMCell(2, 8, rngs=rngs))
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.rnn(x)[:, -1])


def test_nnx_rnn_lstm_trains_under_nnx_jit():
  model = Recurrent(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 5, 2), jnp.float32)
  labels = (x[:, :, 0].sum(1) > 0).astype(jnp.int32) + (x[:, -1, 1] > 0)

  def loss_fn(model):
    logits, acts = sngd_jax.nnx_capture(model, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), acts

  _, acts = loss_fn(model)
  # Every input gate sees x_t at all 5 steps; every recurrent gate sees h_{t-1}.
  assert acts["rnn"]["cell"]["ii"]["inputs"].shape == (16, 5, 2)
  assert acts["rnn"]["cell"]["hi"]["inputs"].shape == (16, 5, 8)
  np.testing.assert_allclose(acts["rnn"]["cell"]["ii"]["inputs"], x)

  optimizer = nnx.Optimizer(model, sngd_jax.sngd(0.1, momentum=0.9,
                                                 inverse_every=5), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, activations=acts)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.5 * losses[0], losses


def test_a_model_that_is_one_layer_gets_its_entry_at_the_root():
  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 3), jnp.float32)
  _, acts = sngd_jax.nnx_capture(layer, x)
  np.testing.assert_array_equal(acts["inputs"], x)
  params = nnx.state(layer, nnx.Param)
  tx = sngd_jax.sngd(0.1)
  updates, _ = tx.update(params, tx.init(params), params, activations=acts)
  assert updates["kernel"].dtype == jnp.float32


def test_linen_capture_takes_a_train_states_apply_fn():
  from flax.training import train_state

  model = LinenCNN()
  images, _, _ = cnn_batch()
  variables = model.init(jax.random.PRNGKey(0), images)
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=optax.sgd(0.1))
  y, acts = sngd_jax.linen_capture(state.apply_fn, {"params": state.params},
                                   images)
  y_ref, acts_ref = sngd_jax.linen_capture(model, variables, images)
  np.testing.assert_array_equal(y, y_ref)
  assert sorted(acts) == sorted(acts_ref) == ["Conv_0", "Dense_0", "LayerNorm_0"]


def test_linen_train_state_forwards_the_activations():
  from flax.training import train_state

  model = LinenCNN()
  images, _, labels = cnn_batch()
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  tx = sngd_jax.sngd(0.1, momentum=0.9)

  def grads_and_acts(params):
    def loss_fn(params):
      logits, acts = sngd_jax.linen_capture(model, {"params": params}, images)
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean(), acts
    (_, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, acts

  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=tx)
  grads, acts = grads_and_acts(params)
  stepped = jax.jit(lambda s, g, a: s.apply_gradients(grads=g, activations=a))(
      state, grads, acts)
  updates, opt_state = tx.update(grads, tx.init(params), params,
                                 activations=acts)
  assert int(stepped.step) == 1
  assert_tree_close(stepped.params,
                    optax.apply_updates(params, updates))
  assert_tree_close(stepped.opt_state, opt_state)
  # Flax's own TrainState drops them: the error names it and the fix.
  flax_state = train_state.TrainState.create(apply_fn=model.apply,
                                             params=params, tx=tx)
  with pytest.raises(ValueError, match="Flax's TrainState.apply_gradients.*"
                     "sngd_jax.TrainState"):
    flax_state.apply_gradients(grads=grads)
