"""The peers' worker: ``python -m sngd_jax.bench.peer_worker PEER TASK LR --epochs E [--steps N]``.

Runs in the peer's own environment (``sngd_jax.bench.peers``) on the
benchmark's tasks, data and loop; prints one JSON result on its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from sngd_jax.bench import harness
from sngd_jax.bench.peers import PEERS


def _task(task_name, suite, epochs, steps):
  task = next(t for t in harness.tasks(suite, fast=False) if t.name == task_name)
  data = task.dataset()
  if steps is not None:
    task, data = harness.smoke(task, data, steps)
  return dataclasses.replace(task, epochs=epochs), data


def _kfac_worker(task, data, lr):
  import jax
  import kfac_jax
  import optax

  model = task.model()
  loss = harness.loss_fn(task)

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
      value_and_grad_func=jax.value_and_grad(objective), l2_reg=0.0,
      use_adaptive_learning_rate=False, learning_rate_schedule=lambda step: lr,
      use_adaptive_momentum=False, momentum_schedule=lambda step: 0.9,
      use_adaptive_damping=False, damping_schedule=lambda step: 1e-3,
      multi_device=False, num_burnin_steps=0)
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
    variables, state, step = carry
    params = variables["params"]
    for x, y in zip(xs, ys):
      params, state, _ = optimizer.step(
          params, state, jax.random.fold_in(rng, step), batch=(x, y),
          global_step_int=step)
      step += 1
    return {"params": params}, state, step

  result, (_, state, _) = harness.run(
      task, data, advance, ({"params": params}, state, 0),
      harness.make_evaluate(task, model))
  result.update(compile_s=compile_s,
                state_bytes=sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)),
                versions=dict(jax=jax.__version__, optax=optax.__version__,
                              kfac_jax=kfac_jax.__version__))
  return result


def _psgd_worker(task, data, lr):
  import jax
  import optax
  from psgd_jax.kron import kron

  harness.OPTIMIZERS["psgd"] = (lambda learning_rate: kron(learning_rate), (lr,))
  result = harness.train(task, data, "psgd", lr)
  result.update(versions=dict(jax=jax.__version__, optax=optax.__version__))
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description="peer optimizer worker")
  parser.add_argument("peer", choices=sorted(PEERS))
  parser.add_argument("task")
  parser.add_argument("lr", type=float)
  parser.add_argument("--suite", default="full")
  parser.add_argument("--epochs", type=int, required=True)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args(argv)
  task, data = _task(args.task, args.suite, args.epochs, args.steps)
  worker = {"kfac": _kfac_worker, "psgd": _psgd_worker}[args.peer]
  result = worker(task, data, args.lr)
  result.update(optimizer=args.peer, lr=args.lr)
  print(json.dumps(result, default=float))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
