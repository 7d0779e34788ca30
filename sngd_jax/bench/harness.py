"""Benchmark: SNGD against the optimizers a user would pick instead, in one run.

``python -m sngd_jax.bench`` trains each task's model on the same data, with
the same seeds and the same batches, under every optimizer; each optimizer
gets the same learning-rate grid (its own, centred on its usual value), the
learning rate is chosen on held-out validation data, and every number comes
from this one process, where a task's runs take their chunks of steps in
turn. Outputs a table per task, loss-vs-time and loss-vs-epoch plots, and a
JSON file with every run's history.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from sngd_jax.bench import data as datasets
from sngd_jax.bench import models
from sngd_jax.bench import peers as peer_runs

# SNGD's options for every task: the library's defaults (statistics every 10
# steps from at most 16 positions per example, 64 where a layer expands;
# inverses every 100, rank-32 Nystrom blocks past 512 inputs, KL clip 0.3,
# weight sharing "auto": recurrent cells and tokens "expand", convolutions and
# images "reduce")
# plus momentum; only the learning rate is tuned.
SNGD_OPTIONS = dict(momentum=0.9)


def _sngd_with(**options):
  """SNGD's factory of the learning rate, with ``options`` beside SNGD_OPTIONS."""
  return lambda learning_rate: sngd_jax.sngd(
      learning_rate, **{**SNGD_OPTIONS, **options})


def _is_sngd(name: str) -> bool:
  return name == "sngd" or name.startswith("sngd(")


def _adam(learning_rate):
  return optax.adam(learning_rate)


def _sgd(learning_rate):
  return optax.sgd(learning_rate, momentum=0.9)


def _adamw(learning_rate):
  return optax.adamw(learning_rate, weight_decay=0.1)


def _muon(learning_rate):
  return optax.contrib.muon(learning_rate)


# Each optimizer: a factory of the learning rate, and its grid: four points,
# half a decade apart, around its usual value. With three, validation picked
# an end of the grid on about half the tasks (SNGD's and Adam's top on the
# ResNet, Muon's bottom on the ResNet and the LM), so each grid gained a
# point on the side its picks reached: up for SNGD, SGD, Adam and AdamW (the
# KL clip bounds SNGD's step at any lr), down for Muon.
OPTIMIZERS: dict[str, tuple[Callable[[float], optax.GradientTransformation], tuple[float, ...]]] = {
    "sngd": (_sngd_with(), (0.03, 0.1, 0.3, 1.0)),
    "adam": (_adam, (1e-3, 3e-3, 1e-2, 3e-2)),
    "sgd": (_sgd, (0.03, 0.1, 0.3, 1.0)),
    "muon": (_muon, (1e-3, 3e-3, 1e-2, 3e-2)),
    "adamw": (_adamw, (1e-3, 3e-3, 1e-2, 3e-2)),
}
# SNGD's rate with no search (README, "Choosing the learning rate"): its run
# in SNGD's grid is reported again as its own row, beside the tuned ones.
NO_SEARCH_LR = 0.3
NO_SEARCH = f"sngd, lr {NO_SEARCH_LR:g} (no search)"
# Baselines that run only on the tasks that name them (Task.extra_optimizers).
OPTIONAL = ("adamw",)
# Their step scales with the gradient (Adam's, Muon's and the peers' do not):
# a task whose loss is a sum over outputs multiplies their grid by its lr_scale.
GRADIENT_SCALED = ("sngd", "sgd")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  dataset: Callable[[], datasets.Dataset]
  model: Callable[[], Any]
  batch_size: int
  epochs: int
  target: float  # train loss to reach
  loss: str = "xent"  # or "bce" (autoencoder reconstruction)
  published: str = ""  # published test accuracy, for context
  clip: float | None = None  # global-norm gradient clipping, for every optimizer alike
  lr_scale: float = 1.0  # for GRADIENT_SCALED optimizers' grids
  extra_optimizers: tuple[str, ...] = ()  # of OPTIONAL
  train_eval_rows: int | None = None  # train loss on this many rows (None: all)
  # Steps run in a jitted scan; False: a jitted step called in a loop, as a
  # user's training loop does. Convolutions run 3.6x (MNIST-1D CNN) to 6.5x
  # (ResNet) slower inside XLA:CPU's while loop, for every optimizer alike;
  # dense models and the LM run 0-15% faster in the scan.
  scan: bool = True
  # Train-loss evaluations per epoch: the clock of time to target reads the
  # first evaluation at or below the target, so it counts in these steps.
  evals_per_epoch: int = 4


def grid(task: Task, name: str) -> tuple[float, ...]:
  scale = task.lr_scale if name in GRADIENT_SCALED or _is_sngd(name) else 1.0
  return tuple(float(f"{lr * scale:.3g}") for lr in OPTIMIZERS[name][1])


MNIST1D_PAPER = "MNIST-1D paper: MLP 68%, CNN 94%, GRU 91%"


def tasks(suite: str, fast: bool) -> list[Task]:
  scale = 0.2 if fast else 1.0
  epochs = lambda e: max(1, int(e * scale))
  mnist1d = _cached(datasets.mnist1d)
  out = [
      Task("mnist1d-mlp", mnist1d, lambda: models.MLP((100, 100)), 100,
           epochs(40), 0.5, published="68%"),
      Task("mnist1d-cnn", mnist1d, lambda: models.CNN(), 100, epochs(30), 0.3,
           published="94%", scan=False),
      Task("mnist1d-gru", mnist1d,
           lambda: models.GRU(32), 100, epochs(20), 1.0, published="91%",
           clip=1.0),
  ]
  if suite == "full":
    if not datasets.fashion_mnist_available():
      print(f"Fashion-MNIST not found in {datasets.FASHION_MNIST_DIR} "
            "(apt-get install dataset-fashion-mnist): its tasks are skipped")
    else:
      fmnist = _cached(datasets.idx_images)
      out += [
          Task("fmnist-mlp-80x3", fmnist, lambda: models.MLP((80, 80, 80)),
               128, epochs(10), 0.25),
          Task("fmnist-mlp-80x6", fmnist, lambda: models.MLP((80,) * 6), 128,
               epochs(10), 0.25),
          Task("fmnist-autoencoder", fmnist, models.Autoencoder, 256,
               epochs(3), 250.0, loss="bce", lr_scale=0.1),
          Task("fmnist-cnn", fmnist,
               lambda: models.CNN((16, 32), kernel=3, spatial=2), 128,
               epochs(3), 0.3, scan=False),
          # BatchNorm residual blocks, widths 16-32-64 (ResNet-8: one block
          # per stage; ResNet-20's three cost 2x a step on 2 CPU cores) on
          # the first 10k training images.
          Task("fmnist-resnet", _cached(lambda: _first_rows(fmnist(), 10000)),
               lambda: models.ResNet(blocks=1), 128, epochs(3), 0.5,
               train_eval_rows=2048, scan=False),
      ]
    # A loss per character, averaged: every position is an example, as
    # weight_sharing "auto" takes tokens ("expand").
    # Its train loss is measured on 1024 of the 6.5k training windows (the
    # whole set would cost more than the training), 8 times an epoch: the
    # optimizers reach the target within a quarter epoch of each other.
    out.append(Task("python-docs-lm", _cached(datasets.python_docs),
                    models.Transformer, 32, epochs(4), 1.5,
                    extra_optimizers=("adamw",),
                    train_eval_rows=1024, evals_per_epoch=8))
  return out


def smoke(task: Task, data: datasets.Dataset, steps: int):
  """A task cut to about ``steps`` steps (the CI smoke run)."""
  rows = steps * task.batch_size
  task = dataclasses.replace(task, epochs=max(1, rows // len(data.x_train)))
  return task, _first_rows(data, rows)


def _first_rows(data: datasets.Dataset, rows: int) -> datasets.Dataset:
  return data._replace(x_train=data.x_train[:rows], y_train=data.y_train[:rows])


def _cached(fn):
  cache = []

  def get():
    if not cache:
      cache.append(fn())
    return cache[0]

  return get


# ----------------------------------------------------------------------------
# Training.


def loss_fn(task: Task):
  """``loss(logits, x, y)``: cross-entropy, or the autoencoder's summed BCE."""

  def loss(logits, x, y):
    if task.loss == "bce":
      target = x.reshape(x.shape[0], -1)
      return optax.sigmoid_binary_cross_entropy(logits, target).sum(-1).mean()
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def _forward(model, variables, x, train, capture=False):
  """Logits, the updated model state (``batch_stats``, when training) and,
  with ``capture``, the activations.

  A model with state (BatchNorm) takes ``train``; one without takes ``x`` only.
  """
  state = [name for name in variables if name != "params"]
  kwargs = dict(train=train, mutable=state if train else False) if state else {}
  if capture:
    out, acts = sngd_jax.linen_capture(model, variables, x, **kwargs)
  else:
    out, acts = model.apply(variables, x, **kwargs), None
  logits, new_state = out if state and train else (out, {})
  return logits, new_state, acts


def make_chunk(task, model, tx, needs_activations):
  """``chunk(variables, opt_state, xs, ys)``: training steps (a scan, or a loop
  of a jitted step where ``task.scan`` is False).

  ``variables`` holds the params and any model state (BatchNorm's
  ``batch_stats``, updated from each batch); the optimizer sees the params.
  """
  loss = loss_fn(task)

  def objective(params, model_state, x, y):
    logits, model_state, acts = _forward(
        model, {"params": params, **model_state}, x, True, needs_activations)
    return loss(logits, x, y), (acts, model_state)

  def step(carry, batch):
    variables, opt_state = carry
    x, y = batch
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    (value, (acts, model_state)), grads = jax.value_and_grad(
        objective, has_aux=True)(params, model_state, x, y)
    extra = {"activations": acts} if needs_activations else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    variables = {"params": optax.apply_updates(params, updates), **model_state}
    return (variables, opt_state), value

  def chunk(variables, opt_state, xs, ys):
    (variables, opt_state), values = jax.lax.scan(
        step, (variables, opt_state), (xs, ys))
    return variables, opt_state, values.mean()

  if task.scan:
    return jax.jit(chunk, donate_argnums=(0, 1)), make_evaluate(task, model)
  one_step = jax.jit(lambda variables, opt_state, x, y: step(
      (variables, opt_state), (x, y)), donate_argnums=(0, 1))

  def looped(variables, opt_state, xs, ys):
    values = []
    for x, y in zip(xs, ys):
      (variables, opt_state), value = one_step(variables, opt_state, x, y)
      values.append(value)
    return variables, opt_state, jnp.mean(jnp.stack(values))

  return looped, make_evaluate(task, model)


def make_evaluate(task, model):
  """``evaluate(variables, x, y) -> (loss, accuracy)``, jitted."""
  loss = loss_fn(task)

  def evaluate(variables, x, y):
    logits, _, _ = _forward(model, variables, x, False)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y) if task.loss == "xent" else jnp.nan
    return loss(logits, x, y), accuracy

  return jax.jit(evaluate)


def _evaluate_in_batches(evaluate, params, x, y, size=5000):
  losses, accs, weights = [], [], []
  for i in range(0, len(x), size):
    loss, accuracy = evaluate(params, x[i:i + size], y[i:i + size])
    losses.append(float(loss)), accs.append(float(accuracy)), weights.append(len(x[i:i + size]))
  return float(np.average(losses, weights=weights)), float(np.average(accs, weights=weights))


_COMPILED: dict = {}  # (task, optimizer, chunk shape) -> compiled chunk and evaluate


def train(task: Task, data: datasets.Dataset, optimizer: str, lr: float,
          seed: int = 0, progress=None) -> dict:
  """One Optax run; returns its history and final metrics."""
  return _finished(training(task, data, optimizer, lr, seed, progress))


def training(task: Task, data: datasets.Dataset, optimizer: str, lr: float,
             seed: int = 0, progress=None):
  """``train`` as a generator: yields after each timed chunk, returns the result.

  The learning rate lives in the optimizer state (``inject_hyperparams``), so
  one compiled program serves every learning rate of the grid.
  """
  model = task.model()
  tx = optax.inject_hyperparams(OPTIMIZERS[optimizer][0])(learning_rate=lr)
  if task.clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(task.clip), tx)
  variables = model.init(jax.random.PRNGKey(seed), data.x_train[:2])
  opt_state = tx.init(variables["params"])
  shape = (chunk_shape(task, data)[0], task.batch_size)
  key = (task.name, optimizer, shape)
  compile_start = time.perf_counter()
  if key not in _COMPILED:
    chunk, evaluate = make_chunk(task, model, tx, _is_sngd(optimizer))
    if task.scan:
      chunk = chunk.lower(variables, opt_state,
                          jax.ShapeDtypeStruct(shape + data.x_train.shape[1:], data.x_train.dtype),
                          jax.ShapeDtypeStruct(shape + data.y_train.shape[1:], jnp.int32)).compile()
    _COMPILED[key] = chunk, evaluate
  chunk, evaluate = _COMPILED[key]
  # One untimed call on copies: first-call costs (and a looped chunk's
  # compilation) are not the optimizer's.
  copies = jax.tree.map(jnp.copy, (variables, opt_state))
  jax.block_until_ready(chunk(*copies, jnp.zeros(shape + data.x_train.shape[1:], data.x_train.dtype),
                              jnp.zeros(shape + data.y_train.shape[1:], jnp.int32)))
  compile_s = time.perf_counter() - compile_start

  def advance(carry, xs, ys):
    variables, opt_state, _ = chunk(*carry, xs, ys)
    return variables, opt_state

  result, (_, opt_state) = yield from running(
      task, data, advance, (variables, opt_state), evaluate, seed, progress)
  result.update(optimizer=optimizer, lr=lr, compile_s=compile_s,
                state_bytes=sum(x.nbytes for x in jax.tree.leaves(opt_state)))
  if _is_sngd(optimizer):
    sngd_state = next(s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, sngd_jax.ScaleBySNGDState))
                      if isinstance(s, sngd_jax.ScaleBySNGDState))
    result["faults"] = dict(stats=int(sngd_state.stats_faults),
                            inverse=int(sngd_state.inverse_faults))
  return result


def chunk_shape(task, data):
  """``(steps per chunk, chunks per epoch, steps per epoch)``: one evaluation per chunk."""
  steps_per_epoch = len(data.x_train) // task.batch_size
  chunk_steps = max(1, steps_per_epoch // task.evals_per_epoch)
  return chunk_steps, steps_per_epoch // chunk_steps, steps_per_epoch


def interleaved(runs) -> list:
  """Advances the generators ``runs`` in turn, one chunk each; their results.

  Every run's clock counts only its own chunks, so a machine whose speed
  drifts over a benchmark (by +-10% within half an hour on the 2-core CPUs
  here) slows every optimizer alike instead of the ones that ran last.
  """
  runs, results = list(runs), dict[int, Any]()
  while len(results) < len(runs):
    for index, steps in enumerate(runs):
      if index not in results:
        try:
          next(steps)
        except StopIteration as end:
          results[index] = end.value
  return [results[index] for index in range(len(runs))]


def _finished(steps):
  """Runs a generator of ``training``/``running`` to its end; returns its value."""
  return interleaved([steps])[0]


def run(task, data, advance, carry, evaluate, seed=0, progress=None):
  """The training loop shared by every optimizer (and the peers' workers).

  See ``running``; returns ``(result, carry)``.
  """
  return _finished(running(task, data, advance, carry, evaluate, seed,
                           progress))


def running(task, data, advance, carry, evaluate, seed=0, progress=None):
  """``run`` as a generator that yields after each timed chunk.

  ``advance(carry, xs, ys)`` takes one chunk of steps (``xs`` of shape
  ``(steps, batch, ...)``) and returns the new carry, whose first element is
  the model's variables (``{"params": ...}`` and any BatchNorm statistics).
  Only ``advance`` is timed; the train loss is evaluated on the
  whole training set after every chunk. The batches come from ``seed``: the
  same for every optimizer.
  """
  chunk_steps, chunks_per_epoch, steps_per_epoch = chunk_shape(task, data)
  shape = (chunk_steps, task.batch_size)
  rng = np.random.default_rng(seed)
  wall, steps, history = 0.0, 0, []
  # The train loss is measured on the training set (or its first rows).
  train_x = data.x_train[:task.train_eval_rows]
  train_y = data.y_train[:task.train_eval_rows]
  train_loss, _ = _evaluate_in_batches(evaluate, carry[0], train_x, train_y)
  history.append(dict(step=0, epoch=0.0, wall=0.0, train_loss=train_loss))
  for _ in range(task.epochs):
    order = rng.permutation(len(data.x_train))[:chunks_per_epoch * chunk_steps * task.batch_size]
    xs = jnp.asarray(data.x_train[order].reshape((chunks_per_epoch,) + shape + data.x_train.shape[1:]))
    ys = jnp.asarray(data.y_train[order].reshape((chunks_per_epoch,) + shape + data.y_train.shape[1:]))
    for c in range(chunks_per_epoch):
      # Sliced before the clock starts: the first slice of a shape compiles
      # (~0.2 s), which the first run of the process (SNGD's) would pay.
      x_chunk, y_chunk = xs[c], ys[c]
      start = time.perf_counter()
      carry = jax.block_until_ready(advance(carry, x_chunk, y_chunk))
      wall += time.perf_counter() - start
      steps += chunk_steps
      train_loss, _ = _evaluate_in_batches(evaluate, carry[0], train_x, train_y)
      history.append(dict(step=steps, epoch=steps / steps_per_epoch, wall=wall,
                          train_loss=train_loss))
      yield
      if not np.isfinite(train_loss):
        break
    if progress is not None:
      progress.update(1)
    if not np.isfinite(train_loss):
      break
  val_loss, val_acc = _evaluate_in_batches(evaluate, carry[0], data.x_val, data.y_val)
  test_loss, test_acc = _evaluate_in_batches(evaluate, carry[0], data.x_test, data.y_test)
  reached = next((h for h in history if h["train_loss"] <= task.target), None)
  return dict(
      steps=steps, wall=wall, step_ms=1e3 * wall / max(steps, 1),
      final_train_loss=train_loss, val_loss=val_loss, val_accuracy=val_acc,
      test_loss=test_loss, test_accuracy=test_acc,
      time_to_target=reached and reached["wall"],
      epochs_to_target=reached and reached["epoch"], history=history), carry


# ----------------------------------------------------------------------------
# Reporting.


def peer_status() -> dict[str, str]:
  """How each peer runs in this benchmark, or why it does not."""
  return {name: peer_runs.status(name) or
          f"runs in its own environment (.peers/{name}: {peer.pins}) on the "
          f"same batches, {peer.loop}"
          for name, peer in peer_runs.PEERS.items()}


def _fmt(value, spec):
  return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else format(value, spec)


def table(task: Task, best: dict[str, dict], failures: dict[str, str]) -> str:
  adam_step = best["adam"]["step_ms"] if "adam" in best else None
  rows = [f"### {task.name} (target train loss {task.target}, "
          f"{task.epochs} epochs, batch {task.batch_size}"
          + (f"; published test accuracy {task.published}" if task.published else "") + ")",
          "",
          "| optimizer | lr | time to target (s) | epochs to target | final train loss "
          "| test acc | step time vs Adam | step (ms) | opt state (KiB) |",
          "|---|---|---|---|---|---|---|---|---|"]
  for name, r in best.items():
    ratio = r["step_ms"] / adam_step if adam_step else None
    rows.append(
        f"| {name} | {r['lr']:g} | {_fmt(r['time_to_target'], '.2f')} | "
        f"{_fmt(r['epochs_to_target'], '.2f')} | {_fmt(r['final_train_loss'], '.4f')} | "
        f"{_fmt(r['test_accuracy'] * 100 if task.loss == 'xent' else None, '.1f')} | "
        f"{_fmt(ratio, '.2f')} | {r['step_ms']:.3f} | {r['state_bytes'] / 1024:.1f} |")
  for name, error in failures.items():
    rows.append(f"| {name} | failed at every lr: {error} | | | | | | | |")
  return "\n".join(rows)


def summary(results: list[tuple[Task, dict[str, dict]]]) -> str:
  """One row per task: each optimizer's time / epochs to target, the fastest in bold."""
  names = list(dict.fromkeys(name for _, best in results for name in best))
  rows = ["| task (target, epochs, batch) | " + " | ".join(names)
          + " | SNGD step / Adam |", "|---" * (len(names) + 2) + "|"]
  for task, best in results:
    reached = {name: r["time_to_target"] for name, r in best.items()
               if r["time_to_target"]}
    fastest = min(reached, key=reached.__getitem__) if reached else None
    cells = []
    for name in names:
      r = best.get(name)
      if r is None:
        cells.append("")
        continue
      if r["time_to_target"]:
        cell = f"{r['time_to_target']:.2f} s / {r['epochs_to_target']:.2f}"
        cell = f"**{cell}**" if name == fastest else cell
      else:
        cell = f"never ({_fmt(r['final_train_loss'], '.4g')})"
      cells.append(f"{cell} (lr {r['lr']:g})")
    ratio = (best["sngd"]["step_ms"] / best["adam"]["step_ms"]
             if "sngd" in best and "adam" in best else None)
    rows.append(f"| {task.name} ({task.target:g}, {task.epochs} ep, "
                f"b{task.batch_size}) | " + " | ".join(cells)
                + f" | {_fmt(ratio, '.2f')} |")
  return "\n".join(rows)


def plot(task: Task, best: dict[str, dict], out: Path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for name, r in best.items():
    hist = r["history"]
    for ax, key in zip(axes, ("wall", "epoch")):
      ax.plot([h[key] for h in hist], [h["train_loss"] for h in hist],
              label=f"{name} (lr {r['lr']:g})")
  for ax, label in zip(axes, ("wall-clock training time (s)", "epoch")):
    ax.axhline(task.target, color="gray", ls=":", lw=1)
    ax.set_xlabel(label)
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(task.name)
  fig.tight_layout()
  path = out / f"{task.name}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def add_sngd_variant(spec: str) -> str:
  """Registers SNGD with extra options, ``"kl_clip=1.0,stats_every=2"``; returns its name.

  It runs beside the defaults, on the same grid and batches.
  """
  options = {}
  for item in spec.split(","):
    key, value = item.split("=")
    try:  # numbers, null, true/false, lists and mappings
      options[key] = json.loads(value)
    except json.JSONDecodeError:  # a bare string: layer_fisher=tanh
      options[key] = value
  name = f"sngd({spec})"
  OPTIMIZERS[name] = (_sngd_with(**options), OPTIMIZERS["sngd"][1])
  return name


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--suite", choices=("default", "full"), default="default",
                      help="default: MNIST-1D only; full: adds Fashion-MNIST tasks")
  parser.add_argument("--fast", action="store_true",
                      help="a smoke run: a fifth of the epochs")
  parser.add_argument("--steps", type=int, default=None,
                      help="CI smoke: cap every run at about this many steps")
  parser.add_argument("--tasks", nargs="*", default=None, help="task names to run")
  parser.add_argument("--optimizers", nargs="*", default=[*OPTIMIZERS, *peer_runs.PEERS],
                      help="kfac and psgd run only where `make peers` built their environments")
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--sngd-variants", nargs="*", default=[],
                      help="SNGD with other options beside the defaults, "
                      "e.g. kl_clip=1.0,stats_every=2")
  args = parser.parse_args(argv)
  args.optimizers += [add_sngd_variant(spec) for spec in args.sngd_variants]
  # On CPU, JAX's LAPACK calls (a refresh's Cholesky and eigh) run in scipy's
  # OpenBLAS, loaded at the first one: with its own thread per core it
  # competes with XLA's threads (README: "On CPU"). Only SNGD calls LAPACK.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

  from tqdm.auto import tqdm

  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  selected = [t for t in tasks(args.suite, args.fast)
              if args.tasks is None or t.name in args.tasks]
  peers = peer_status()
  machine = (f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
             f"{jax.devices()[0].platform}, OPENBLAS_NUM_THREADS="
             f"{os.environ['OPENBLAS_NUM_THREADS']}")
  report = {"machine": machine, "peers": peers, "sngd_options": SNGD_OPTIONS,
            "versions": {p: importlib.metadata.version(p) for p in
                         ("jax", "optax", "flax", "sngd-jax")},
            "tasks": {}}
  lines = [f"Machine: {machine}", ""]
  peer_names = [p for p in peer_runs.PEERS
                if p in args.optimizers and peer_runs.status(p) is None]
  results = []
  for task in selected:
    data = task.dataset()
    if args.steps is not None:
      task, data = smoke(task, data, args.steps)
    runs = []
    optax_runs = [o for o in args.optimizers if o in OPTIMIZERS and (
        o not in OPTIONAL or o in task.extra_optimizers)]
    total = (sum(len(grid(task, o)) for o in optax_runs)
             + sum(len(peer_runs.PEERS[p].learning_rates) for p in peer_names)
             ) * task.epochs
    errors: dict[str, list[str]] = {}
    with tqdm(total=total, desc=task.name, unit="epoch") as bar:
      # Every optimizer and learning rate takes its chunks in turn (``interleaved``).
      runs += interleaved(training(task, data, name, lr, progress=bar)
                          for name in optax_runs for lr in grid(task, name))
      for name in peer_names:
        for lr in peer_runs.PEERS[name].learning_rates:
          bar.set_postfix(optimizer=name, lr=lr)
          try:
            runs.append(peer_runs.run_peer(name, task.name, args.suite, lr,
                                           task.epochs, args.steps))
          except RuntimeError as error:  # reported in the table, not hidden
            errors.setdefault(name, []).append(str(error))
          bar.update(task.epochs)
    failures = {name: messages[-1] for name, messages in errors.items()
                if not any(r["optimizer"] == name for r in runs)}
    best = {}
    for name in dict.fromkeys(r["optimizer"] for r in runs):
      mine = [r for r in runs if r["optimizer"] == name]
      best[name] = min(mine, key=lambda r: r["val_loss"] if np.isfinite(r["val_loss"]) else np.inf)
    untuned = [r for r in runs if r["optimizer"] == "sngd" and np.isclose(
        r["lr"], NO_SEARCH_LR * task.lr_scale)]
    if untuned:
      best[NO_SEARCH] = untuned[0]
    results.append((task, best))
    text = table(task, best, failures)
    print("\n" + text + "\n", flush=True)
    lines += [text, ""]
    png = plot(task, best, out)
    report["tasks"][task.name] = dict(task=dataclasses.asdict(task) | {"dataset": data.name, "model": None},
                                      runs=runs, best={k: v["lr"] for k, v in best.items()},
                                      peer_errors=errors,
                                      plot=str(png))
  lines.append("Peers: " + "; ".join(f"{k}: {v}" for k, v in peers.items()))
  print(lines[-1])
  # The verdict first: time (s) / epochs to target per task and optimizer.
  overview = summary(results)
  print("\n" + overview)
  lines[2:2] = ["Time to target (s) / epochs to target, the lr validation picked:",
                "", overview, ""]
  (out / "results.md").write_text("\n".join(lines) + "\n")
  (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
  print(f"Wrote {out / 'results.md'}, {out / 'results.json'} and the plots in {out}/")


if __name__ == "__main__":
  main()
