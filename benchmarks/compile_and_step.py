"""Compile time, program size and step time: SNGD against AdamW and Muon.

NNX GPTs (d_model 256, 4 heads, ``nnx.MultiHeadAttention``, tied embeddings)
of several depths, written both ways a Flax user writes them: a Python loop
over an ``nnx.List`` of blocks (unrolled) and blocks made by ``nnx.vmap``
and run by ``nnx.scan`` (scanned). For each optimizer, in one process:

- ``update``: seconds to trace, lower and compile ``tx.update`` alone
  (jitted, on the gradients' and activations' shapes; ``tx.init`` not
  counted), and its optimized HLO's lines;
- ``step``: seconds to lower and compile the whole training step (forward,
  capture, backward, update), without running it (its first call runs a
  refresh);
- ``ms``: the steady step, the median of ``--steps`` calls after
  ``--warmup`` (50: past SNGD's young EMA, which takes a statistic every
  step for its first ~45 at the default ``ema_decay``), statistics and
  refreshes then at their default intervals.

    python benchmarks/compile_and_step.py --blocks 2 6 12 --forms unrolled scanned

Compile times are wall-clock on this machine (XLA:CPU compiles a program's
kernels on a couple of threads); ratios against AdamW are what carry to
other machines.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sngd_jax

VOCAB, CONTEXT, BATCH = 256, 64, 8


class Block(nnx.Module):

  def __init__(self, dim, heads, rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(heads, dim, decode=False,
                                            rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class GPT(nnx.Module):
  """A decoder; ``scanned``: its blocks one stack run by ``nnx.scan``."""

  def __init__(self, blocks, scanned, dim=256, heads=4, rngs=None,
               vocab=VOCAB, context=CONTEXT):
    rngs = rngs or nnx.Rngs(0)
    self.scanned = scanned
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.position = nnx.Embed(context, dim, rngs=rngs)
    if scanned:
      @nnx.split_rngs(splits=blocks)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stack(rngs):
        return Block(dim, heads, rngs)

      self.blocks = stack(rngs)
    else:
      self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(blocks)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[1]))
    mask = nnx.make_causal_mask(tokens)
    if self.scanned:
      @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
      def through(x, block, mask):
        return block(x, mask)

      x = through(x, self.blocks, mask)
    else:
      for block in self.blocks:
        x = block(x, mask)
    return self.embed.attend(self.norm(x))


OPTIMIZERS = {
    "sngd": lambda: sngd_jax.sngd(1.0, momentum=0.9),
    "adamw": lambda: optax.adamw(3e-3),
    "muon": lambda: optax.contrib.muon(3e-3),
}


def update_compile(tx, grads, params, acts, needs_activations):
  """Seconds to compile ``tx.update`` alone on these shapes, and its
  optimized HLO's lines."""
  extra = {"activations": acts} if needs_activations else {}
  state = jax.block_until_ready(tx.init(params))
  start = time.perf_counter()
  compiled = jax.jit(lambda g, s, p, e: tx.update(g, s, p, **e)).lower(
      grads, state, params, extra).compile()
  return time.perf_counter() - start, compiled.as_text().count("\n")


def measure(blocks, scanned, name, steps, warmup):
  """``{update_s, update_hlo, step_s, step_ms}`` of one optimizer on one GPT."""
  model = GPT(blocks, scanned)
  tx = OPTIMIZERS[name]()
  needs = name == "sngd"
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (BATCH, CONTEXT + 1), 0,
                              VOCAB)

  def loss_fn(model):
    logits, acts = sngd_jax.nnx_capture(model, tokens[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()
    return loss, acts

  # tx.update alone, on the shapes it sees in the step.
  params = nnx.state(model, nnx.Param)
  (_, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  update_s, update_hlo = update_compile(tx, grads, params, acts, needs)

  @nnx.jit
  def train_step(model, optimizer):
    (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads, **({"activations": acts} if needs else {}))
    return loss

  start = time.perf_counter()
  train_step.lower(model, optimizer).compile()
  step_s = time.perf_counter() - start
  for _ in range(warmup):  # compiles again (the call's own cache), then a refresh
    jax.block_until_ready(train_step(model, optimizer))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(train_step(model, optimizer))
    times.append(time.perf_counter() - start)
  return dict(update_s=update_s, update_hlo=update_hlo, step_s=step_s,
              step_ms=1e3 * float(np.median(times)))


def measure_resnet(name, steps, warmup, batch=8, size=32):
  """``measure``'s numbers for a ResNet-18 (linen, BatchNorm) on ImageNet's
  1000 classes at ``size`` x ``size`` inputs (compile time barely depends
  on the size)."""
  from sngd_jax.bench import models

  model = models.ResNet(blocks=2, widths=(64, 128, 256, 512), outputs=1000)
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, size, size, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch,), 0, 1000)
  variables = model.init(jax.random.PRNGKey(0), x)
  params, batch_stats = variables["params"], variables["batch_stats"]
  tx = {"sngd": OPTIMIZERS["sngd"], "adam": lambda: optax.adam(1e-3),
        "muon": OPTIMIZERS["muon"]}[name]()
  needs = name == "sngd"

  def loss_fn(params, batch_stats):
    (logits, updated), acts = sngd_jax.linen_capture(
        model, {"params": params, "batch_stats": batch_stats}, x, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (acts, updated["batch_stats"])

  state = tx.init(params)
  (_, (acts, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats)
  update_s, update_hlo = update_compile(tx, grads, params, acts, needs)

  @jax.jit
  def train_step(params, batch_stats, state):
    (loss, (acts, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, batch_stats)
    updates, state = tx.update(grads, state, params,
                               **({"activations": acts} if needs else {}))
    return optax.apply_updates(params, updates), batch_stats, state, loss

  start = time.perf_counter()
  train_step.lower(params, batch_stats, state).compile()
  step_s = time.perf_counter() - start
  carry = params, batch_stats, state
  for _ in range(warmup):
    carry = jax.block_until_ready(train_step(*carry))[:3]
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    carry = jax.block_until_ready(train_step(*carry))[:3]
    times.append(time.perf_counter() - start)
  return dict(update_s=update_s, update_hlo=update_hlo, step_s=step_s,
              step_ms=1e3 * float(np.median(times)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", type=int, nargs="+", default=[2, 6, 12])
  parser.add_argument("--forms", nargs="+", default=["unrolled", "scanned"],
                      choices=["unrolled", "scanned"])
  parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                      choices=list(OPTIMIZERS))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=50,
                      help="steps run before the timed ones")
  parser.add_argument("--resnet", action="store_true",
                      help="also a linen ResNet-18 against Adam and Muon")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"batch {BATCH} x {CONTEXT} tokens")
  print("| GPT | optimizer | update compile (s) | update HLO lines | "
        "step compile (s) | step (ms) | vs AdamW: update compile, HLO, "
        "step compile, step |")
  print("|---|---|---|---|---|---|---|")
  for form in args.forms:
    for blocks in args.blocks:
      rows = {name: measure(blocks, form == "scanned", name, args.steps,
                             args.warmup)
              for name in args.optimizers}
      base = rows.get("adamw")
      for name, row in rows.items():
        ratios = "" if base is None else ", ".join(
            f"{row[key] / base[key]:.1f}x" for key in
            ("update_s", "update_hlo", "step_s", "step_ms"))
        print(f"| {blocks} blocks, {form} | {name} | {row['update_s']:.2f} | "
              f"{row['update_hlo']} | {row['step_s']:.2f} | "
              f"{row['step_ms']:.1f} | {ratios} |", flush=True)
  if args.resnet:
    rows = {name: measure_resnet(name, args.steps, args.warmup)
            for name in ("sngd", "adam", "muon")}
    for name, row in rows.items():
      ratios = ", ".join(f"{row[key] / rows['adam'][key]:.1f}x" for key in
                         ("update_s", "update_hlo", "step_s", "step_ms"))
      print(f"| ResNet-18 (linen), batch 8 x 32x32 | {name} | "
            f"{row['update_s']:.2f} | {row['update_hlo']} | "
            f"{row['step_s']:.2f} | {row['step_ms']:.1f} | {ratios} (vs Adam) |",
            flush=True)


if __name__ == "__main__":
  main()
