"""The refresh divided among devices (``refresh_axis``): FLOPs and time.

For 1, 2, 4 and 8 simulated CPU devices (each count in its own process, with
``--xla_force_host_platform_device_count``), the deep autoencoder and a wide
MLP 784-4096-4096-10 with SNGD's defaults, data parallel (batch sharded,
params replicated), and for FLOPs only an MLP 784-2048-2048-10 with exact
blocks (``nystrom=None``), whose 2048-output layers take output factors:
- per-device FLOPs of the compiled refresh (``sngd_jax.bench.flops``: XLA's
  count plus the factorizations' custom calls) with ``refresh_axis`` against
  the same refresh computed whole on every device, and the output factors'
  share of the whole refresh;
- the refresh's time, divided and whole;
- the mean step time of ``sngd(0.1, momentum=0.9, refresh_axis="data")``
  (statistics and refreshes at their default intervals included) against
  Adam at the same device count, compiled programs of 30 steps (the young-EMA warm-up: a statistic every step, a refresh every 10).

On one machine's simulated devices the times measure the program, not a
speed-up (the devices share the same cores); the FLOPs per device are what a
real mesh divides.

    python benchmarks/refresh_scaling.py
"""

import json
import os
import subprocess
import sys
import time

STEPS = 30
MODELS = ("autoencoder 784-1000-500-250-30-...-784", "mlp 784-4096-4096-10",
          "mlp 784-2048-2048-10, exact blocks")


def measure(devices: int) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sngd_jax
  from sngd_jax import transform
  from sngd_jax.bench import flops, models
  from sngd_jax.bench import harness as bench

  mesh = jax.make_mesh((devices,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  # (model, batch, loss, nystrom, timed): the exact MLP's refresh (two
  # 2048-row eigendecompositions, 2049-row Choleskys) is counted, not run.
  makes = {MODELS[0]: (models.Autoencoder, 256, "bce", sngd_jax.Nystrom(), True),
           MODELS[1]: (lambda: models.MLP((4096, 4096)), 128, "xent",
                       sngd_jax.Nystrom(), True),
           MODELS[2]: (lambda: models.MLP((2048, 2048)), 64, "xent", None,
                       False)}
  rows = []
  for name, (make, batch, loss, nystrom, run) in makes.items():
    model = make()
    xs = jax.random.uniform(jax.random.PRNGKey(0), (STEPS, batch, 28, 28))
    ys = jax.random.randint(jax.random.PRNGKey(1), (STEPS, batch), 0, 10)
    params = model.init(jax.random.PRNGKey(0), xs[0])["params"]
    layers, _ = transform.plan_layers(params, "linear", nystrom)
    stats = {layer.path: layer.block.init(jnp.float32) for layer in layers}

    def timed(fn, *args, repeats=3):
      jax.block_until_ready(fn(*args))
      times = []
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
      return float(np.median(times))

    with jax.set_mesh(mesh):
      def compiled_flops(options, axis=None, layers=layers, stats=stats):
        return flops.program_flops(jax.jit(lambda s: flops.refresh(
            options, layers, s, axis)).lower(stats).compile())

      whole = jax.jit(lambda s, layers=layers: flops.refresh({}, layers, s))
      divided = jax.jit(lambda s, layers=layers: flops.refresh(
          {}, layers, s, "data"))
      row = dict(model=name, devices=devices,
                 whole_flops=compiled_flops({}),
                 divided_flops=compiled_flops({}, "data"),
                 input_flops=compiled_flops({"output_factor": False}))
      rows.append(row)
      if not run:
        continue
      row.update(whole_s=timed(whole, stats), divided_s=timed(divided, stats))
      task = bench.Task("scaling", None, None, batch, 1, 0.0, loss=loss)
      sharded = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "data")))
      xs_d, ys_d = sharded(xs), sharded(ys)
      for label, tx, needs in (
          ("adam", optax.adam(1e-3), False),
          ("sngd", sngd_jax.sngd(0.1, momentum=0.9, refresh_axis="data"), True)):
        chunk, _ = bench.make_chunk(task, model, tx, needs)
        variables = {"params": params}
        carry = (variables, tx.init(params))
        seconds = timed(lambda carry=carry, chunk=chunk, xs=xs_d, ys=ys_d: chunk(
            *jax.tree.map(jnp.copy, carry), xs, ys)[2], repeats=2)
        row[f"{label}_step_ms"] = 1e3 * seconds / xs.shape[0]
  return rows


def main():
  if len(sys.argv) > 1:  # a worker: one device count
    print(json.dumps(measure(int(sys.argv[1]))))
    return
  results = []
  for devices in (1, 2, 4, 8):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = subprocess.run([sys.executable, __file__, str(devices)], env=env,
                         capture_output=True, text=True, check=True)
    results += json.loads(out.stdout.strip().splitlines()[-1])
  print("| model | devices | refresh GFLOP per device: whole / divided "
        "| divided / one device's | output factors' share "
        "| refresh (ms): whole / divided | Adam step (ms) | SNGD step / Adam |")
  print("|---|---|---|---|---|---|---|---|")
  single = {r["model"]: r["whole_flops"] for r in results if r["devices"] == 1}
  for r in sorted(results, key=lambda r: (r["model"], r["devices"])):
    times = (f"{1e3 * r['whole_s']:.1f} / {1e3 * r['divided_s']:.1f} | "
             f"{r['adam_step_ms']:.2f} | "
             f"{r['sngd_step_ms'] / r['adam_step_ms']:.2f}"
             if "whole_s" in r else "not run | | ")
    print(f"| {r['model']} | {r['devices']} | {r['whole_flops'] / 1e9:.3f} / "
          f"{r['divided_flops'] / 1e9:.3f} | "
          f"{r['divided_flops'] / single[r['model']]:.3f} | "
          f"{1 - r['input_flops'] / r['whole_flops']:.3f} | {times} |")


if __name__ == "__main__":
  main()
