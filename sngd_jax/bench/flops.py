"""FLOPs of a compiled program, per device, custom calls included.

XLA's ``cost_analysis()`` counts its own operations (dots, elementwise) but
not the LAPACK/cuSOLVER custom calls that factorize matrices: a 256 x 256
Cholesky inverse reports about 3e5 FLOPs for its ~4e7. This module adds the
textbook counts of those calls, read from the compiled (per-device, after
SPMD partitioning) HLO with their operand shapes:

| call | FLOPs |
|---|---|
| Cholesky ``potrf`` of ``n x n`` | ``n^3 / 3`` |
| triangular solve ``trsm``, ``n x n`` against ``n x k`` | ``n^2 k`` |
| symmetric eigendecomposition ``syevd`` of ``n x n`` (with vectors) | ``9 n^3`` (Golub & Van Loan) |
| Householder QR ``geqrf`` of ``m x n``, and forming its ``Q`` (``orgqr``) | ``2 m n^2 - 2 n^3 / 3`` each |

each times the batch (leading dimensions).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from sngd_jax import linalg, transform

_SHAPE = re.compile(r"[fc](?:16|32|64)\[([0-9,]*)\]")


def _dims(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in m.group(1).split(",") if d)
          for m in _SHAPE.finditer(text)]


def custom_call_flops(hlo_text: str) -> float:
  """The FLOPs of the factorizations (custom calls) in a compiled HLO module."""
  total = 0.0
  for line in hlo_text.splitlines():
    target = re.search(r'custom_call_target="([^"]+)"', line)
    if " triangular-solve(" in line:
      name = "trsm"
    elif target:
      name = target.group(1).lower()
    else:
      continue
    head = re.search(r"=\s*(.*?)\s(?:custom-call|triangular-solve)\(", line)
    result = _dims(head.group(1)) if head else []
    layouts = re.search(r"operand_layout_constraints=\{(.*?)\}, ", line)
    operands = _dims(layouts.group(1)) if layouts else []
    if "potrf" in name and result:
      *batch, n, _ = result[0]
      total += math.prod(batch) * n ** 3 / 3
    elif "trsm" in name and operands:
      *batch, n, _ = operands[0]
      total += math.prod(batch) * n * n * result[0][-1]
    elif "syev" in name and result:
      *batch, n, _ = max(result, key=len)
      total += math.prod(batch) * 9 * n ** 3
    elif ("geqrf" in name or "orgqr" in name) and result:
      *batch, m, n = max(result, key=len)
      total += math.prod(batch) * (2 * m * n * n - 2 * n ** 3 / 3)
  return total


def program_flops(compiled) -> float:
  """Per-device FLOPs of a compiled program: XLA's count plus its custom calls."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older JAX: one dict per program
    analysis = analysis[0]
  xla = max(float(analysis.get("flops", 0.0)), 0.0)
  return xla + custom_call_flops(compiled.as_text())


def refresh(tx_options: dict, layers, stats, refresh_axis=None):
  """Every layer's refresh (first attempt, grouped as ``scale_by_sngd``
  groups them), the function whose compiled FLOPs the scaling benchmark
  reports."""
  defaults = inspect.signature(transform.scale_by_sngd).parameters

  def option(name):
    return tx_options.get(name, defaults[name].default)

  damping = linalg.Damping(jnp.asarray(option("damping")),
                           jnp.asarray(option("relative_damping")),
                           option("max_condition"))
  solver = option("solver")
  layers_by_path = {layer.path: layer for layer in layers}
  out: dict[str, Any] = {}
  groups: dict[tuple, list] = {}
  for layer in layers:
    # One device refreshes a group's blocks in a loop, whose FLOPs XLA's
    # cost analysis counts once: alone, each is counted.
    dtype = jax.tree.leaves(stats[layer.path])[0].dtype
    alike = (layer.block, dtype) if refresh_axis else (layer.path,)
    groups.setdefault(alike, []).append(layer.path)
  for paths in groups.values():
    fresh = transform.refresh_group(
        layers_by_path[paths[0]].block, jax.tree.map(
            lambda *xs: jnp.stack(xs), *[stats[path] for path in paths]),
        damping, solver, refresh_axis)
    out.update((path, jax.tree.map(lambda x, i=i: x[i], fresh))
               for i, path in enumerate(paths))
  # The output factors' roots, grouped by output size as the transform
  # groups them (alone on one device, as above).
  factored: dict[tuple, list] = {}
  for layer in layers:
    if transform.takes_output_factor(layer, transform.output_factor_limit(
        option("output_factor"))):
      alike = (layer.d_out,) if refresh_axis else (layer.path,)
      factored.setdefault(alike, []).append(layer)
  for number, group in enumerate(factored.values()):
    # Distinct statistics (XLA would compute equal ones once).
    eye = jnp.eye(group[0].d_out, dtype=jnp.float32)
    roots = transform.output_factor_roots(
        jnp.stack([eye * (number + 1 + i / len(group))
                   for i in range(len(group))]),
        jnp.ones([], jnp.float32), refresh_axis)
    out.update((f"{layer.path}/output", jax.tree.map(lambda x, i=i: x[i], roots))
               for i, layer in enumerate(group))
  return out
