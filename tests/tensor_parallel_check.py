"""A tensor-parallel transformer under Explicit meshes equals one device.

Run by tests/test_sharding.py in a process of its own with 8 simulated CPU
devices. The model carries the Flax MiniGPT tutorial's annotations: q/k/v,
MLP-input and output kernels split along their outputs over ``model``
(``P(None, 'model')``), the MLP's output kernel along its inputs, biases and
LayerNorm scales over ``model``; the batch over ``batch``. Prints one JSON
line: each mesh's largest relative parameter difference from one device.
"""

import json

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import sngd_jax

DIM, HEADS, VOCAB, CONTEXT = 32, 4, 64, 8


def model_and_optimizer(sharded: bool):
  def split(init, spec):
    return nnx.with_partitioning(init, spec) if sharded else init

  columns = split(nnx.initializers.xavier_uniform(), (None, "model"))
  rows = split(nnx.initializers.xavier_uniform(), ("model", None))
  zeros = split(nnx.initializers.zeros_init(), ("model",))
  ones = split(nnx.initializers.ones_init(), ("model",))
  batch_only = P("batch", None, None) if sharded else None

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.attention = nnx.MultiHeadAttention(
          HEADS, DIM, kernel_init=columns, bias_init=zeros, decode=False,
          rngs=rngs)
      self.norm = nnx.LayerNorm(DIM, scale_init=ones, bias_init=zeros,
                                rngs=rngs)
      self.up = nnx.Linear(DIM, 4 * DIM, kernel_init=columns,
                           bias_init=zeros, rngs=rngs)
      self.down = nnx.Linear(4 * DIM, DIM, kernel_init=rows, bias_init=zeros,
                             rngs=rngs)

    def __call__(self, x):
      x = x + self.attention(
          x, mask=nnx.make_causal_mask(jnp.ones(x.shape[:2])))
      return x + self.down(nnx.gelu(self.up(self.norm(x))),
                           out_sharding=batch_only)

  class GPT(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
      self.blocks = nnx.List([Block(rngs) for _ in range(2)])
      self.out = nnx.Linear(DIM, VOCAB, kernel_init=columns, rngs=rngs)

    def __call__(self, tokens):
      x = self.embed(tokens, out_sharding=batch_only)
      for block in self.blocks:
        x = block(x)
      return self.out(x, out_sharding=batch_only)

  model = GPT(nnx.Rngs(0))
  return model, nnx.Optimizer(model, sngd_jax.sngd(0.3, momentum=0.9),
                              wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, tokens):
  def loss_fn(model):
    logits, acts = sngd_jax.nnx_capture(model, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean(), acts

  (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads, activations=acts)


def trained(mesh_shape=None):
  tokens = jax.random.randint(jax.random.key(1), (16, CONTEXT + 1), 0, VOCAB)
  if mesh_shape is None:
    model, optimizer = model_and_optimizer(sharded=False)
    for _ in range(3):
      train_step(model, optimizer, tokens)
  else:
    mesh = jax.make_mesh(mesh_shape, ("batch", "model"),
                         axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
      model, optimizer = model_and_optimizer(sharded=True)
      tokens = jax.device_put(tokens, P("batch", None))
      for _ in range(3):
        train_step(model, optimizer, tokens)
      # The update leaves the params and the momentum split as they were.
      up = (DIM, 4 * DIM)
      specs = {str(jax.typeof(x).sharding.spec) for x in jax.tree.leaves(
          (nnx.state(model), nnx.state(optimizer))) if x.shape == up}
      assert specs == {str(P(None, "model"))}, specs
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def main():
  alone = trained()
  report = {}
  for shape in ((4, 2), (2, 4)):
    gaps = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
            for a, b in zip(alone, trained(shape))]
    report[f"{shape[0]}x{shape[1]}"] = max(gaps)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
