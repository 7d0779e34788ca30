"""Mutation check: every deliberate bug in the library must fail a test.

Applies each mutation below to the library source, one at a time, runs the
tests that cover that code (``-x``: the first failure is enough), restores the
file, and prints which test caught each mutation. Exits 1 if a mutation
survives. Run with ``make mutants`` (35-50 minutes on 2 cores, longer on a
slow machine).

Mutations that cannot change any result are left out, with the reason: the
statistics are symmetric, so transposing ``E[x x^T]`` (or a per-unit block)
is the same matrix.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXACT = ["tests/test_exact_ngd.py", "tests/test_flax.py",
         "tests/test_weight_sharing.py", "tests/test_transformers.py"]


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str  # library file
  old: str  # text replaced (must occur exactly once)
  new: str
  tests: tuple[str, ...] = tuple(EXACT)


MUTATIONS = [
    Mutation("preconditioner replaced by the identity", "sngd_jax/transform.py",
             "directions[stack.key] = stack.each(stack.block.apply)(\n"
             "            precond, gradients[stack.key], stack.entry(entries))",
             "directions[stack.key] = gradients[stack.key]"),
    Mutation("linear: bias row dropped (zeros for ones)", "sngd_jax/fisher.py",
             "moment, corner = second_moment(x), jnp.ones((1, 1), dtype)",
             "moment, corner = second_moment(x), jnp.zeros((1, 1), dtype)"),
    Mutation("linear: input mean left out of the bias row", "sngd_jax/fisher.py",
             "mean = batch_mean(\"ni->i\", x if slopes is None else x * s)",
             "mean = 0 * batch_mean(\"ni->i\", x if slopes is None else x * s)"),
    Mutation("per-unit and nystrom: bias row dropped (zeros for ones)",
             "sngd_jax/fisher.py",
             "jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)",
             "jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)"),
    Mutation("linear: statistic scaled by 2", "sngd_jax/fisher.py",
             "return augmented_moment(materialized(entry[\"inputs\"]), self.n, dtype,",
             "return 2 * augmented_moment(materialized(entry[\"inputs\"]), self.n, dtype,"),
    Mutation("nystrom: diagonal scaled by 2", "sngd_jax/fisher.py",
             "\"diagonal\": jnp.mean(xt * xt, axis=0)}",
             "\"diagonal\": 2 * jnp.mean(xt * xt, axis=0)}"),
    Mutation("per-unit: nu dropped (linear block per unit)", "sngd_jax/fisher.py",
             "weights = self.nu(rows(entry[\"outputs\"], dtype))",
             "weights = jnp.ones_like(rows(entry[\"outputs\"], dtype))"),
    Mutation("per-unit: blocks given to the wrong units (transposed unit axis)",
             "sngd_jax/fisher.py",
             "return jnp.einsum(\"jik,kj->ij\", precond, g)",
             "return jnp.einsum(\"jik,kj->ij\", precond[::-1], g)"),
    Mutation("softmax: output factor dropped", "sngd_jax/fisher.py",
             "output = (jnp.diag(batch_mean(\"nj->j\", root * root * eta))\n"
             "              - second_moment(root * eta))",
             "output = jnp.eye(eta.shape[1], dtype=eta.dtype) / eta.shape[1]"),
    Mutation("softmax: statistic scaled by 2", "sngd_jax/fisher.py",
             "return {\"output\": output, \"input\": augmented_moment(",
             "return {\"output\": output, \"input\": 2 * augmented_moment("),
    Mutation("affine: shift column dropped", "sngd_jax/fisher.py",
             "jnp.stack([mean, ones], -1)], -2)",
             "jnp.stack([mean, 0 * ones], -1)], -2)"),
    Mutation("affine: the shift's mean left out", "sngd_jax/fisher.py",
             "mean = batch_mean(\"nc->c\", weighted)",
             "mean = 0 * batch_mean(\"nc->c\", weighted)"),
    Mutation("norm: xhat read at the layer's own scale", "sngd_jax/capture.py",
             "return (jnp.ones_like(v) if name == \"scale\" else",
             "return (v if name == \"scale\" else",
             ("tests/test_transformers.py",)),
    *[Mutation(f"position mask: {name}", path, old, new,
               ("tests/test_transformers.py",)) for name, path, old, new in [
        ("not normalized over the real positions", "sngd_jax/transform.py",
         "if fisher.WEIGHTS in sampled and not reduce:",
         "if fisher.WEIGHTS in sampled and reduce:"),
        ("ignored by the linear kind", "sngd_jax/fisher.py",
         "row_weights(entry, dtype, with_slopes=True))",
         "entry.get(SLOPES))"),
        ("ignored by the per-unit kinds", "sngd_jax/fisher.py",
         "weights = weights * row_weights(entry, dtype)", "pass"),
        ("ignored by softmax's output factor", "sngd_jax/fisher.py",
         "root = 1.0 if weights is None else jnp.sqrt(weights)", "root = 1.0"),
        ("ignored by the norms", "sngd_jax/fisher.py",
         "ones, weighted = ones * batch_mean(\"ni->i\", weights), xhat * weights",
         "pass"),
        ("ignored by the embedding's counts", "sngd_jax/fisher.py",
         "each = each * _replicated(weights)[:, 0]", "pass"),
    ]],
    Mutation("batches sized without the triangular solves",
             "sngd_jax/fisher.py",
             "largest = max(largest, rhs[-2] * rhs[-1] * shape[-1])", "pass",
             ("tests/test_stacked.py",)),
    Mutation("eigendecompositions batched as if Choleskys",
             "sngd_jax/fisher.py", "9.0 * max(shape[-2:]) ** 3",
             "max(shape[-2:]) ** 3 / 3", ("tests/test_stacked.py",)),
    Mutation("softmax: both Kronecker factors scaled by the uses",
             "sngd_jax/fisher.py",
             "return {**stats, \"input\": stats[\"input\"] * uses_per_example(entry[\"inputs\"])}",
             "return jax.tree.map(lambda s: s * uses_per_example(entry[\"inputs\"]), stats)"),
    Mutation("embedding: the condition cap without the counts",
             "sngd_jax/fisher.py",
             "jnp.max(stats[\"counts\"]) + jnp.max(values)))",
             "jnp.max(values)))", ("tests/test_step_control.py",)),
    Mutation("clip: the learning rate read at step 0", "sngd_jax/transform.py",
             "rate = learning_rate(count) if callable(learning_rate) else learning_rate",
             "rate = learning_rate(0) if callable(learning_rate) else learning_rate",
             ("tests/test_step_control.py", "tests/test_optax.py")),
    Mutation("embedding: frequencies scaled by 2", "sngd_jax/fisher.py",
             "each = jnp.asarray(1.0 / ids.shape[0], dtype)",
             "each = jnp.asarray(2.0 / ids.shape[0], dtype)"),
    Mutation("embedding: attend side dropped", "sngd_jax/fisher.py",
             "hidden = second_moment(attend)",
             "hidden = 0 * second_moment(attend)"),
    Mutation("damping ignored", "sngd_jax/linalg.py",
             "    shift = self.absolute + self.relative * trace / dim",
             "    shift = 0 * (self.absolute + self.relative * trace / dim) + 1e-12"),
    Mutation("EMA decay ignored", "sngd_jax/transform.py",
             "ema = jax.tree.map(lambda o, s: ema_decay * o + (1 - ema_decay) * s,",
             "ema = jax.tree.map(lambda o, s: 0 * o + (1 - ema_decay) * s,",
             ("tests/test_exact_ngd.py", "tests/test_optax.py", "tests/test_reliability.py")),
    Mutation("weight sharing: reduce scale ignored", "sngd_jax/transform.py",
             "      stat = layer.block.scaled(stat, entry)",
             "      pass",
             ("tests/test_weight_sharing.py",)),
    Mutation("nystrom: the clip's quadratic form without its low-rank part",
             "sngd_jax/linalg.py",
             "jnp.vdot(v, v) - jnp.vdot(projected, core @ projected)",
             "jnp.vdot(v, v)",
             ("tests/test_linalg.py",)),
    Mutation("vmap: each model decides for itself (selects, not conds)",
             "sngd_jax/transform.py",
             "return jax.lax.pmax(decision.astype(jnp.int32), vmap_axis_name) > 0",
             "return decision",
             ("tests/test_optax.py",)),
    Mutation("one layer's fault: the other layers' statistics go on",
             "sngd_jax/transform.py",
             "lambda new, old: jnp.where(faults == 0, new, old)",
             "lambda new, old: new",
             ("tests/test_reliability.py",)),
    Mutation("relative damping and the warm-up's shrinkage toward I, not "
             "the mean eigenvalue", "sngd_jax/linalg.py",
             "shift = self.absolute + self.relative * trace / dim",
             "shift = self.absolute + self.relative",
             ("tests/test_step_control.py",)),
    Mutation("KL clip ignored", "sngd_jax/transform.py",
             "    scale = _kl_clip_scale(applied, rate, kl_clip)",
             "    scale = jnp.ones([])",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the buffer's cross term dropped",
             "sngd_jax/transform.py",
             "+ 2 * momentum * cross + vg, 0.0)",
             "+ vg, 0.0)",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the old buffer's length not decayed",
             "sngd_jax/transform.py",
             "jnp.maximum(momentum ** 2 * momentum_norm",
             "jnp.maximum(momentum_norm",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the buffer not remeasured after a refresh",
             "sngd_jax/transform.py",
             "momentum_norm = jax.lax.cond(refresh, metric,",
             "momentum_norm = jax.lax.cond(False, metric,",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the cross term not weighted by a cell's uses",
             "sngd_jax/transform.py",
             "weights[layer.path] * jnp.vdot(buffer[index],",
             "jnp.vdot(buffer[index],",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the remeasure not weighted by a cell's uses",
             "sngd_jax/transform.py",
             "return jnp.sum(row_weights(stack) * stack.each(",
             "return jnp.sum(stack.each(",
             ("tests/test_step_control.py",)),
    Mutation("momentum clip: the remeasure in P's metric, not P^-1's",
             "sngd_jax/linalg.py",
             "solved = jax.scipy.linalg.solve_triangular(chol, m, lower=True)",
             "solved = chol.T @ m",
             ("tests/test_step_control.py",)),
    Mutation("clip: a recurrent cell's steps counted once",
             "sngd_jax/transform.py",
             "      return fisher.uses_per_example(entry[\"inputs\"])",
             "      return 1",
             ("tests/test_step_control.py",)),
    Mutation("sampled positions: scaled by the sampled uses",
             "sngd_jax/transform.py",
             "stat = layer.block.scaled(stat, entry)",
             "stat = layer.block.scaled(stat, sampled)",
             ("tests/test_weight_sharing.py",)),
    Mutation("sampled positions: inputs and outputs drawn apart",
             "sngd_jax/fisher.py",
             "flat.at[:, picked(flat.shape[1])]",
             "flat.at[:, picked_positions(seed + flat.shape[-1], "
             "flat.shape[1], limit)]",
             ("tests/test_weight_sharing.py",)),
    Mutation("capture: records inside jax.checkpoint dropped",
             "sngd_jax/capture.py",
             "        for use in uses:\n          _record(outer_key, use)",
             "        del uses",
             ("tests/test_transformers.py",)),
    Mutation("divided refresh: every device solves the first share of columns",
             "sngd_jax/fisher.py",
             "which, share = jnp.minimum(device // sharing, blocks - 1), device % sharing",
             "which, share = jnp.minimum(device // sharing, blocks - 1), 0 * device",
             ("tests/test_sharding.py",)),
    Mutation("divided Nystrom: B^T B from this device's rows only",
             "sngd_jax/linalg.py",
             "gram, captured = jax.lax.psum((mine.T @ mine, jnp.sum(mine * mine)),\n"
             "                                  axis_name)",
             "gram, captured = mine.T @ mine, jnp.sum(mine * mine)",
             ("tests/test_sharding.py",)),
    Mutation("output factor: not applied to the direction",
             "sngd_jax/transform.py",
             "directions[stack.key] = directions[stack.key] @ factors[stack.key][0]",
             "directions[stack.key] = directions[stack.key]",
             ("tests/test_output_factor.py",)),
    Mutation("output factor: from g^T g (the input side not whitened out)",
             "sngd_jax/transform.py",
             "product = (jnp.matrix_transpose(directions[stack.key])",
             "product = (jnp.matrix_transpose(gradients[stack.key])",
             ("tests/test_output_factor.py",)),
    Mutation("output factor: the momentum metric without it",
             "sngd_jax/transform.py",
             "m = m @ factors[stack.key][1]",
             "m = m",
             ("tests/test_step_control.py",)),
    Mutation("output factor: not shrunk toward I while the EMA is young",
             "sngd_jax/linalg.py",
             "shrunk = weight * relative + (1 - weight) * eye",
             "shrunk = relative",
             ("tests/test_output_factor.py",)),
    Mutation("output factor, wide layers: the rest's mean not kept (1 for it)",
             "sngd_jax/linalg.py",
             "rest = jnp.clip((dim - jnp.sum(eigvals)) / (dim - rank), *eigenvalue_range)",
             "rest = jnp.clip(jnp.ones_like(dim - jnp.sum(eigvals)), *eigenvalue_range)",
             ("tests/test_linalg.py", "tests/test_output_factor.py")),
    Mutation("output factor, wide layers: no subspace iteration",
             "sngd_jax/linalg.py",
             "basis = jax.lax.fori_loop(\n      0, iterations,",
             "basis = jax.lax.fori_loop(\n      0, 0,",
             ("tests/test_linalg.py", "tests/test_output_factor.py")),
    Mutation("output factor: an int cap ignored",
             "sngd_jax/transform.py",
             "    return int(output_factor)\n",
             "    return OUTPUT_MAX_DIM\n",
             ("tests/test_output_factor.py",)),
    Mutation("weight_sharing auto: scanned cells reduce too",
             "sngd_jax/fisher.py",
             "  if SCANNED in entry:\n    return \"expand\"\n", "",
             ("tests/test_weight_sharing.py",)),
    Mutation("weight_sharing auto: tokens reduce",
             "sngd_jax/fisher.py",
             'return "expand" if len(_position_axes(inputs)) == 1 else "reduce"',
             'return "reduce"',
             ("tests/test_weight_sharing.py",)),
    Mutation("padded refresh: an exact block damped as the padded size",
             "sngd_jax/fisher.py",
             'size = None if own is None else own["size"]', "size = None",
             ("tests/test_stacked.py",)),
    Mutation("padded refresh: Nystrom's spectral shift over the padded rows",
             "sngd_jax/linalg.py",
             "missed = max(n - m, 1) if size is None else jnp.maximum(size - m, 1)",
             "missed = max(n - m, 1)",
             ("tests/test_stacked.py",)),
    Mutation("finiteness check blind (statistics, inverses, output factors)",
             "sngd_jax/transform.py",
             "return jnp.isfinite(jnp.sum(x * 0, axis=axis))",
             "return jnp.isfinite(jnp.sum(jnp.zeros_like(x), axis=axis))",
             ("tests/test_reliability.py",)),
    Mutation("update: products at the platform's default precision",
             "sngd_jax/transform.py", "  @linalg.full_precision\n", "",
             ("tests/test_linalg.py",)),
    Mutation("linalg: products at the platform's default precision",
             "sngd_jax/linalg.py",
             'with jax.default_matmul_precision("float32"):\n      return',
             'with jax.default_matmul_precision(None):\n      return',
             ("tests/test_linalg.py",)),
    Mutation("activations: a hand-built entry at a path with no params accepted",
             "sngd_jax/transform.py", "  if stray:\n", "  if False:\n",
             ("tests/test_errors.py", "tests/test_optax.py")),
    Mutation("capture: entries not marked as captured", "sngd_jax/capture.py",
             "return {**_merge(uses), fisher.CAPTURED: fisher.Captured()}",
             "return _merge(uses)", ("tests/test_flax.py",)),
] + [
    Mutation(f"capture: no entry for {kind} layers", "sngd_jax/capture.py",
             # Only the return: what follows it in ``old`` stays as it was.
             old, "return None" + old[old.find("\n"):] if "\n" in old else "return None",
             ("tests/test_flax.py", "tests/test_transformers.py"))
    for kind, old in [
        ("dense", "return {\"inputs\": x, \"outputs\": y}\n  if kind == \"dense_params\""),
        ("conv", "return entry\n  if kind == \"embed\""),
        ("embed", "return {\"inputs\": x}\n  return {\"attend\""),
        ("attend", "return {\"attend\": x}"),
        ("DenseGeneral", "return _general_entry(layer, x, y)"),
        ("Einsum", "return _einsum_entry(x, y, einsum_str or layer.einsum_str)"),
    ]
] + [
    Mutation(f"capture: no entry for {name} norm layers", "sngd_jax/capture.py",
             old, "None", ("tests/test_flax.py", "tests/test_transformers.py"))
    for name, old in [
        ("NNX", "{\"inputs\": _nnx_norm_inputs(self, original, x, args, kwargs)}"),
        ("linen", "{\"inputs\": _linen_norm_inputs(layer, x, rest, call_kwargs)}"),
    ]
]


def run(mutation: Mutation) -> str | None:
  """The first test that fails under the mutation, or None if all pass."""
  path = ROOT / mutation.path
  original = path.read_text()
  if original.count(mutation.old) != 1:
    raise ValueError(f"{mutation.name}: the text to mutate occurs "
                     f"{original.count(mutation.old)} times in {mutation.path}")
  path.write_text(original.replace(mutation.old, mutation.new))
  try:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "-n", "2", *mutation.tests], cwd=ROOT, capture_output=True, text=True)
  finally:
    path.write_text(original)
  failed = re.findall(r"^FAILED (\S+)", done.stdout, re.M)
  if failed:
    return failed[0]
  return None if done.returncode == 0 else f"(pytest exit {done.returncode})"


def main():
  print("| mutation | caught by |\n|---|---|", flush=True)
  survivors = []
  for mutation in MUTATIONS:
    caught = run(mutation)
    print(f"| {mutation.name} | {caught or 'SURVIVED'} |", flush=True)
    if caught is None:
      survivors.append(mutation.name)
  if survivors:
    print(f"{len(survivors)} mutation(s) survived: {survivors}")
    sys.exit(1)


if __name__ == "__main__":
  main()
