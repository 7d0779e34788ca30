"""Peer optimizers that need their own environment, run as subprocesses.

K-FAC (``kfac-jax``) 0.0.8 fails inside its graph tracer with the JAX the
project resolves (0.10.x) and runs with JAX 0.9.0, so it runs in its own
virtual environment (``make peers`` builds ``.peers/kfac``) through this
module's worker, on the same tasks, data, batches and training loop as the
benchmark (``sngd_jax.bench.run``). PSGD (``psgd-jax`` 0.2.9) imports a
private Optax module that optax 0.2.8 no longer has; it is reported, not run.

Worker: ``python -m sngd_jax.peers kfac TASK LR --epochs E [--steps N]``
prints one JSON result (the benchmark's format) on its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

# K-FAC runs like SNGD does: the same learning-rate grid, momentum 0.9, and
# kfac-jax's adaptive damping (from 1.0). Its fully adaptive mode (adaptive
# learning rate and momentum) diverged on Fashion-MNIST within three epochs at
# every initial damping of (0.01, 0.1, 1) in our runs.
KFAC_LEARNING_RATES = (0.03, 0.1, 0.3)
PEER_PYTHON = Path(__file__).resolve().parent.parent / ".peers/kfac/bin/python"


def kfac_available() -> str | None:
  """None when the K-FAC environment exists, else why it does not run."""
  if PEER_PYTHON.exists():
    return None
  return ("kfac-jax 0.0.8 fails in its graph tracer with jax 0.10.x; its own "
          "environment (jax 0.9.0) is not built: run `make peers`")


def run_kfac(task_name: str, suite: str, lr: float, epochs: int,
             steps: int | None) -> dict:
  """Runs the worker in the K-FAC environment; returns its result dict."""
  command = [str(PEER_PYTHON), "-m", "sngd_jax.peers", "kfac", task_name,
             str(lr), "--suite", suite, "--epochs", str(epochs)]
  if steps is not None:
    command += ["--steps", str(steps)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
  if done.returncode != 0:
    raise RuntimeError(done.stderr[-2000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def _kfac_worker(task_name: str, suite: str, lr: float, epochs: int,
                 steps: int | None):
  import jax
  import kfac_jax
  import optax

  from sngd_jax import bench

  task = next(t for t in bench.tasks(suite, fast=False) if t.name == task_name)
  data = task.dataset()
  if steps is not None:
    task, data = bench.smoke(task, data, steps)
  task = dataclasses.replace(task, epochs=epochs)
  model = task.model()
  loss = bench.loss_fn(task)

  def objective(params, batch):
    x, y = batch
    logits = model.apply({"params": params}, x)
    if task.loss == "bce":
      kfac_jax.register_sigmoid_cross_entropy_loss(
          logits, x.reshape(x.shape[0], -1))
    else:
      kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    return loss(logits, x, y)

  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(objective),
      l2_reg=0.0, use_adaptive_learning_rate=False,
      learning_rate_schedule=lambda step: lr, use_adaptive_momentum=False,
      momentum_schedule=lambda step: 0.9, use_adaptive_damping=True,
      initial_damping=1.0, multi_device=False, num_burnin_steps=0)
  params = model.init(jax.random.PRNGKey(0), data.x_train[:2])["params"]
  rng = jax.random.PRNGKey(1)
  batch = (data.x_train[:task.batch_size], data.y_train[:task.batch_size])
  compile_start = time.perf_counter()
  state = optimizer.init(params, rng, batch)
  # Compile and warm up on copies (K-FAC's step donates its arguments), over
  # enough steps to reach each of its differently compiled step kinds.
  warm_params, warm_state = jax.tree.map(jax.numpy.copy, (params, state))
  for step in range(12):
    warm_params, warm_state, _ = optimizer.step(
        warm_params, warm_state, rng, batch=batch, global_step_int=step)
  jax.block_until_ready(warm_params)
  compile_s = time.perf_counter() - compile_start

  def advance(carry, xs, ys):
    params, state, step = carry
    for x, y in zip(xs, ys):
      params, state, _ = optimizer.step(params, state, rng, batch=(x, y),
                                        global_step_int=step)
      step += 1
    return params, state, step

  result, (params, state, _) = bench.run(
      task, data, advance, (params, state, 0), bench.make_evaluate(task, model))
  result.update(optimizer="kfac", lr=lr, compile_s=compile_s,
                state_bytes=sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)),
                versions=dict(jax=jax.__version__, optax=optax.__version__))
  print(json.dumps(result))


def main(argv=None):
  parser = argparse.ArgumentParser(description="peer optimizer worker")
  parser.add_argument("peer", choices=["kfac"])
  parser.add_argument("task")
  parser.add_argument("lr", type=float)
  parser.add_argument("--suite", default="full")
  parser.add_argument("--epochs", type=int, required=True)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args(argv)
  _kfac_worker(args.task, args.suite, args.lr, args.epochs, args.steps)


if __name__ == "__main__":
  main()
