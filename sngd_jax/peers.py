"""Peer optimizers that need their own environment, run as subprocesses.

Two peers cannot live beside the JAX and Optax this project resolves, so each
runs in its own virtual environment (``make peers`` builds them under
``.peers/``) through this module's worker, on the same tasks, data, batches
and training loop as the benchmark (``sngd_jax.bench.run``):

- K-FAC (``kfac-jax`` 0.0.8) fails inside its graph tracer with JAX 0.10.x
  and runs with JAX 0.9.0. It runs as kfac-jax recommends for stochastic
  training (its ImageNet examples): fixed damping 1e-3, momentum 0.9, a
  learning-rate grid; its adaptive learning rate, momentum and damping are
  meant for full-batch training (they diverged here on mini-batches).
- PSGD (``psgd-jax`` 0.2.9, the Kron preconditioner) imports a private Optax
  module that optax 0.2.8 no longer has; it runs with optax 0.2.4, through the
  benchmark's own compiled Optax loop.

Worker: ``python -m sngd_jax.peers PEER TASK LR --epochs E [--steps N]``
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

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Peer:
  why: str  # why it cannot run beside the project's own pins
  pins: str  # what its environment holds
  learning_rates: tuple[float, ...]  # its grid, three points around its usual value
  loop: str  # how its steps run

  def python(self, name: str) -> Path:
    return ROOT / ".peers" / name / "bin" / "python"


PEERS = {
    "kfac": Peer(
        why="kfac-jax 0.0.8 fails in its graph tracer with jax 0.10.x",
        pins="jax 0.9.0, kfac-jax 0.0.8; damping 1e-3, momentum 0.9",
        learning_rates=(3e-4, 1e-3, 3e-3),
        loop="kfac-jax's own jitted step, one dispatch per step"),
    "psgd": Peer(
        why="psgd-jax 0.2.9 imports a private Optax module that optax 0.2.8 removed",
        pins="jax 0.10.2, optax 0.2.4, psgd-jax 0.2.9 (kron, defaults)",
        learning_rates=(3e-4, 1e-3, 3e-3),
        loop="the benchmark's own compiled loop"),
}


def status(name: str) -> str | None:
  """None when the peer's environment exists, else why it does not run."""
  peer = PEERS[name]
  if peer.python(name).exists():
    return None
  return f"not run: {peer.why}; its environment is not built (`make peers`)"


def run_peer(name: str, task_name: str, suite: str, lr: float, epochs: int,
             steps: int | None) -> dict:
  """Runs the worker in the peer's environment; returns its result dict.

  Raises:
    RuntimeError: the worker failed; the message is the end of its stderr.
  """
  command = [str(PEERS[name].python(name)), "-m", "sngd_jax.peers", name,
             task_name, str(lr), "--suite", suite, "--epochs", str(epochs)]
  if steps is not None:
    command += ["--steps", str(steps)]
  done = subprocess.run(command, capture_output=True, text=True, timeout=3600,
                        cwd=ROOT)
  if done.returncode != 0:
    lines = done.stderr.strip().splitlines() or ["(no output)"]
    raise RuntimeError(next((line for line in reversed(lines)
                             if "Error" in line.split(":")[0]), lines[-1])[:300])
  return json.loads(done.stdout.strip().splitlines()[-1])


def _task(task_name, suite, epochs, steps):
  from sngd_jax import bench

  task = next(t for t in bench.tasks(suite, fast=False) if t.name == task_name)
  data = task.dataset()
  if steps is not None:
    task, data = bench.smoke(task, data, steps)
  return dataclasses.replace(task, epochs=epochs), data


def _kfac_worker(task, data, lr):
  import jax
  import kfac_jax
  import optax

  from sngd_jax import bench

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
    params, state, step = carry
    for x, y in zip(xs, ys):
      params, state, _ = optimizer.step(
          params, state, jax.random.fold_in(rng, step), batch=(x, y),
          global_step_int=step)
      step += 1
    return params, state, step

  result, (params, state, _) = bench.run(
      task, data, advance, (params, state, 0), bench.make_evaluate(task, model))
  result.update(compile_s=compile_s,
                state_bytes=sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)),
                versions=dict(jax=jax.__version__, optax=optax.__version__,
                              kfac_jax=kfac_jax.__version__))
  return result


def _psgd_worker(task, data, lr):
  import jax
  import optax
  from psgd_jax.kron import kron

  from sngd_jax import bench

  bench.OPTIMIZERS["psgd"] = (lambda learning_rate: kron(learning_rate), (lr,))
  result = bench.train(task, data, "psgd", lr)
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
