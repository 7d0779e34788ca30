"""Peer optimizers that need their own environment, run as subprocesses.

Two peers cannot live beside the JAX and Optax this project resolves, so each
runs in its own virtual environment (``make peers`` builds them under
``.peers/``) through this module's worker, on the same tasks, data, batches
and training loop as the benchmark (``sngd_jax.bench.harness.run``):

- K-FAC (``kfac-jax`` 0.0.8) fails inside its graph tracer with JAX 0.10.x
  and runs with JAX 0.9.0. It runs as kfac-jax recommends for stochastic
  training (its ImageNet examples): fixed damping 1e-3, momentum 0.9, a
  learning-rate grid; its adaptive learning rate, momentum and damping are
  meant for full-batch training (they diverged here on mini-batches).
- PSGD (``psgd-jax`` 0.2.9, the Kron preconditioner) imports a private Optax
  module that optax 0.2.8 no longer has; it runs with optax 0.2.4, through the
  benchmark's own compiled Optax loop.

The worker (``sngd_jax.bench.peer_worker``) runs in the peer's environment
and prints one JSON result (the benchmark's format) on its last line.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
  command = [str(PEERS[name].python(name)), "-m", "sngd_jax.bench.peer_worker", name,
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
