"""The GPU check: SNGD's step and time to a target loss against AdamW and Muon.

Made to run in at most 8 minutes on one GPU, in one process:

1. ``gpt``: an NNX GPT of realistic size (d_model 512, 8 blocks scanned,
   8 heads, context 256, batch 32) on Python's own standard-library sources
   (characters), each optimizer at two learning rates for ``--seconds`` of
   training each, the runs interleaved a chunk at a time so that the
   machine's drift falls on all of them alike;
2. ``bench``: the benchmark's language model and ResNet tasks
   (``python -m sngd_jax.bench --suite full --fast``; the ResNet's where
   Fashion-MNIST is installed), in what time is left.

For each optimizer: the median step (ms), its ratio to AdamW's, and the
wall time (training steps only, compile excluded) to the target, the
smoothed training loss that every optimizer's best run reached.

    python benchmarks/gpu.py               # on the GPU, about 8 minutes
    python benchmarks/gpu.py --dry-run     # tiny sizes, a few steps (CPU, tests)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
from compile_and_step import GPT
from flax import nnx

import sngd_jax
from sngd_jax.bench import data

OPTIMIZERS = {  # two learning rates each, around the benchmark's picks
    "sngd": (lambda learning_rate: sngd_jax.sngd(learning_rate, momentum=0.9),
             (0.3, 1.0)),
    "adamw": (lambda learning_rate: optax.adamw(learning_rate,
                                                weight_decay=0.1), (1e-3, 3e-3)),
    "muon": (lambda learning_rate: optax.contrib.muon(learning_rate),
             (3e-3, 1e-2)),
}
SIZES = {
    "full": dict(dim=512, blocks=8, heads=8, context=256, batch=32, chunk=25),
    "dry-run": dict(dim=32, blocks=2, heads=2, context=16, batch=4, chunk=2),
}


def training_chunk(needs_activations):
  """A jitted chunk of training steps (``nnx.scan`` over the batches)."""
  @nnx.jit
  def chunk(model, optimizer, xs, ys):
    def body(carry, batch):
      model, optimizer = carry
      x, y = batch

      def loss_fn(model):
        logits, acts = sngd_jax.nnx_capture(model, x)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean(), acts

      (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
      optimizer.update(model, grads, **(
          {"activations": acts} if needs_activations else {}))
      return (model, optimizer), loss

    _, losses = nnx.scan(body)((model, optimizer), (xs, ys))
    return losses

  return chunk


class Run:
  """One optimizer at one learning rate, trained a chunk of steps at a time.

  The runs of one optimizer share its ``tx`` (the learning rate injected,
  ``optax.inject_hyperparams``) and its jitted ``chunk``: their models and
  optimizers have the same structure, so the chunk compiles once for both.
  """

  def __init__(self, name, lr, size, dataset, tx, chunk):
    self.name, self.lr, self.size, self.dataset = name, lr, size, dataset
    self.model = GPT(size["blocks"], scanned=True, dim=size["dim"],
                     heads=size["heads"], rngs=nnx.Rngs(0),
                     vocab=len(data.CHARACTERS), context=size["context"])
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)
    self.optimizer.opt_state.hyperparams["learning_rate"][...] = lr
    self.chunk = chunk
    self.rng = np.random.default_rng(0)  # the same batches for every run
    self.seconds, self.losses, self.times = 0.0, [], []
    start = time.perf_counter()
    self.step()  # compiles (the optimizer's first run)
    self.first_s = time.perf_counter() - start
    self.seconds, self.losses, self.times = 0.0, [], []

  def step(self):
    """One chunk: its steps' losses and the wall time, kept."""
    size, x = self.size, self.dataset.x_train
    rows = self.rng.integers(0, len(x), (size["chunk"], size["batch"]))
    start = time.perf_counter()
    losses = np.asarray(jax.block_until_ready(self.chunk(
        self.model, self.optimizer, x[rows], self.dataset.y_train[rows])))
    elapsed = time.perf_counter() - start
    self.seconds += elapsed
    self.times.append(elapsed / size["chunk"])
    self.losses.extend(losses.tolist())

  def smoothed(self):
    """The losses' running mean over ``chunk`` steps, with each one's time."""
    k = self.size["chunk"]
    smooth = np.convolve(self.losses, np.ones(k) / k, mode="valid")
    return smooth, np.repeat(self.times, k)[k - 1:].cumsum()


def gpt(size, seconds):
  """Each optimizer's two learning rates, interleaved for ``seconds`` each."""
  dataset = data.python_sources(context=size["context"])
  runs, compile_s = [], {}
  for name, (make, lrs) in OPTIMIZERS.items():
    tx = optax.inject_hyperparams(make)(learning_rate=lrs[0])
    chunk = training_chunk(name == "sngd")
    runs += [Run(name, lr, size, dataset, tx, chunk) for lr in lrs]
    compile_s[name] = runs[-len(lrs)].first_s
  def more(run):  # at least two chunks: the smoothed loss needs one
    return run.seconds < seconds or len(run.times) < 2

  while any(map(more, runs)):
    for run in filter(more, runs):
      run.step()
  best = {}
  for run in runs:
    final = run.smoothed()[0][-1]
    if np.isfinite(final) and (run.name not in best or
                               final < best[run.name].smoothed()[0][-1]):
      best[run.name] = run
  target = max(run.smoothed()[0][-1] for run in best.values())
  base = float(np.median(best["adamw"].times)) if "adamw" in best else None
  print(f"\nGPT d{size['dim']} x {size['blocks']} blocks (scanned), context "
        f"{size['context']}, batch {size['batch']}, on "
        f"{jax.devices()[0].device_kind}; {seconds:.0f} s of training each; "
        f"target: smoothed train loss {target:.3f}")
  print("| optimizer | lr | compile (s) | step (ms) | step / AdamW's | steps | "
        "final loss | time to target (s) |")
  print("|---|---|---|---|---|---|---|---|")
  for name, run in best.items():
    smooth, elapsed = run.smoothed()
    reached = np.flatnonzero(smooth <= target + 1e-9)
    step = float(np.median(run.times))
    print(f"| {name} | {run.lr:g} | {compile_s[name]:.1f} | {1e3 * step:.2f} | "
          f"{step / base if base else float('nan'):.2f}x | {len(run.losses)} | "
          f"{smooth[-1]:.3f} | {elapsed[reached[0]]:.1f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dry-run", action="store_true",
                      help="tiny sizes and a few steps: checks the script")
  parser.add_argument("--seconds", type=float, default=40.0,
                      help="training seconds per run of the GPT")
  parser.add_argument("--budget", type=float, default=450.0,
                      help="seconds for the whole script; the benchmark's "
                           "tasks get what the GPT leaves")
  args = parser.parse_args()
  start = time.perf_counter()
  print(f"jax {jax.__version__}, devices: {jax.devices()}")
  if args.dry_run:
    gpt(SIZES["dry-run"], seconds=0.0)
    return
  gpt(SIZES["full"], args.seconds)
  left = args.budget - (time.perf_counter() - start)
  command = [sys.executable, "-m", "sngd_jax.bench", "--suite", "full",
             "--fast", "--tasks", "python-docs-lm", "fmnist-resnet",
             "--optimizers", "sngd", "adam", "adamw", "muon",
             "--out", str(Path("bench_out") / "gpu")]
  print(f"\n{' '.join(command)} (stopped after {left:.0f} s)", flush=True)
  try:
    subprocess.run(command, timeout=max(left, 1.0), check=False)
  except subprocess.TimeoutExpired:
    print("the benchmark's tasks ran out of time", flush=True)


if __name__ == "__main__":
  main()
