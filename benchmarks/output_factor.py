"""An experiment, not a library option: SNGD with an output-side per-unit factor.

SNGD's dense and conv blocks act on a layer's inputs only; K-FAC's Fisher
also has an output factor ``E[delta delta^T]``, which needs the gradients of
the layer's outputs (the capture does not record them). This script tries a
stand-in that needs nothing new: per output unit ``j`` (the kernel's last
axis), ``s_j`` = an EMA of the unit's share ``v_j . g_j`` of the step's
``v . g``; the direction of unit ``j`` is divided by ``sqrt(s_j / mean(s))``,
clamped to [1/4, 4], then clipped at SNGD's former KL clip (0.3, at ``lr / (1 -
momentum)``). Everything else is SNGD's defaults with momentum 0.9.

Runs the language model (with ``--suite full``) and the MNIST-1D GRU, each
SNGD form on the benchmark's grid beside Adam, AdamW and Muon at theirs, one
process, the benchmark's loop and batches; prints every run.

    python benchmarks/output_factor.py [--suite full]
"""

import argparse
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sngd_jax
from sngd_jax.bench import harness as bench
from sngd_jax.transform import _kl_clip_scale


class OutputFactorState(NamedTuple):
  inner: Any  # scale_by_sngd's state
  shares: Any  # per kernel: (d_out,) EMA of v_j . g_j; None for 1-D leaves
  count: jax.Array  # int32 ()


def output_factor_sngd(learning_rate, momentum=0.9, decay=0.95, kl_clip=0.3,
                       **options):
  inner = sngd_jax.scale_by_sngd(kl_clip=None, **options)
  rate = learning_rate / (1 - momentum)

  def per_unit(v, g):
    return jnp.sum((v * g).reshape(-1, v.shape[-1]), 0) if v.ndim >= 2 else None

  def init(params):
    shares = jax.tree.map(lambda p: jnp.zeros(p.shape[-1:]) if p.ndim >= 2 else None,
                          params)
    return OutputFactorState(inner.init(params), shares, jnp.zeros([], jnp.int32))

  def update(grads, state, params=None, **extra):
    v, inner_state = inner.update(grads, state.inner, params, **extra)
    shares = jax.tree.map(lambda s, q: decay * s + (1 - decay) * q, state.shares,
                          jax.tree.map(per_unit, v, grads))
    debias = 1 - decay ** (state.count + 1).astype(jnp.float32)

    def divided(v, s):
      if s is None:
        return v
      s = jnp.maximum(s / debias, 0.0)  # a shared block's share can dip below 0
      return v * jnp.clip(jax.lax.rsqrt(s / (jnp.mean(s) + 1e-30)), 0.25, 4.0)

    v = jax.tree.map(divided, v, shares, is_leaf=lambda x: x is None)
    vg = sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(grads)))
    scale = _kl_clip_scale(vg, rate, kl_clip)  # SNGD's own clip
    return (jax.tree.map(lambda x: x * scale, v),
            OutputFactorState(inner_state, shares, state.count + 1))

  return optax.chain(optax.GradientTransformationExtraArgs(init, update),
                     optax.trace(momentum), optax.scale_by_learning_rate(learning_rate))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--suite", choices=("default", "full"), default="default")
  args = parser.parse_args()
  name = "sngd(output factor)"
  for task in bench.tasks(args.suite, fast=False):
    if task.name not in ("python-docs-lm", "mnist1d-gru"):
      continue
    options = dict(task.sngd_options)
    bench.OPTIMIZERS[name] = (
        lambda learning_rate, options=options: output_factor_sngd(learning_rate, **options),
        bench.OPTIMIZERS["sngd"][1])
    data = task.dataset()
    print(f"{task.name} (target {task.target}): optimizer, lr, time (s) / epochs "
          "to target, final train loss, validation loss, step (ms)")
    for optimizer in ("sngd", name, "adam", "adamw", "muon"):
      for lr in bench.grid(task, optimizer):
        r = bench.train(task, data, optimizer, lr)
        reached = (f"{r['time_to_target']:.2f} / {r['epochs_to_target']:.2f}"
                   if r["time_to_target"] else "never")
        print(f"  {optimizer}, {lr}, {reached}, {r['final_train_loss']:.4f}, "
              f"{r['val_loss']:.4f}, {r['step_ms']:.2f}", flush=True)


if __name__ == "__main__":
  main()
