"""Smoke run of the benchmark CLI: a few steps per optimizer, every output written."""

import dataclasses
import json
import os

import jax
import numpy as np

from sngd_jax.bench import data, models
from sngd_jax.bench import harness as bench


def _random_dataset(shape, classes, seed=0):
  """Standard-normal inputs of ``shape`` and random labels: 64/16/16 rows."""
  rng = np.random.default_rng(seed)
  inputs = lambda n: rng.standard_normal((n, *shape), dtype=np.float32)
  labels = lambda n: rng.integers(0, classes, n).astype(np.int32)
  return data.Dataset(inputs(64), labels(64), inputs(16), labels(16),
                      inputs(16), labels(16), "random")


def test_bench_smoke_writes_tables_plots_and_json(tmp_path, capsys):
  bench.main(["--tasks", "mnist1d-mlp", "--steps", "40", "--out", str(tmp_path),
              "--optimizers", *bench.OPTIMIZERS,
              "--sngd-variants", "kl_clip=1.0,stats_every=2"])
  report = json.loads((tmp_path / "results.json").read_text())
  # The OpenBLAS threads (one, unless the environment set them) are reported.
  assert f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}" in report["machine"]
  runs = report["tasks"]["mnist1d-mlp"]["runs"]
  # AdamW runs only on the tasks that name it (the language model).
  expected = {*bench.OPTIMIZERS} - {"adamw"}
  assert {r["optimizer"] for r in runs} == expected
  assert "sngd(kl_clip=1.0,stats_every=2)" in expected
  assert len(runs) == sum(len(bench.OPTIMIZERS[name][1]) for name in expected)
  for run in runs:
    assert run["steps"] > 0 and run["step_ms"] > 0 and run["state_bytes"] > 0
    assert run["history"][0]["train_loss"] > 0
  sngd = [r for r in runs if r["optimizer"] == "sngd"]
  assert all(r["faults"] == {"stats": 0, "inverse": 0} for r in sngd)
  assert (tmp_path / "mnist1d-mlp.png").stat().st_size > 10_000
  table = (tmp_path / "results.md").read_text()
  assert "| sngd |" in table and "| adam |" in table and "Peers: kfac" in table
  # The summary: one row per task, a cell per optimizer.
  assert "| task (target, epochs, batch) | sngd | adam |" in table
  row = next(line for line in table.splitlines()
             if line.startswith("| mnist1d-mlp (0.5, "))
  # Each optimizer at the lr validation picked, and SNGD's run at 0.3 again.
  assert row.count("(lr ") == len(expected) + 1
  assert f"| {bench.NO_SEARCH} | 0.3 |" in table
  assert "step time vs Adam" in capsys.readouterr().out


def test_variant_options_parse_json_values_and_bare_strings(monkeypatch):
  monkeypatch.setattr(bench, "OPTIMIZERS", dict(bench.OPTIMIZERS))
  seen = []
  monkeypatch.setattr(bench.sngd_jax, "sngd",
                      lambda lr, **options: seen.append(options))
  name = bench.add_sngd_variant("kl_clip=null,layer_fisher=tanh,stats_every=2,"
                                "nystrom=null,weight_sharing=expand")
  bench.OPTIMIZERS[name][0](0.1)
  assert seen == [dict(bench.SNGD_OPTIONS, kl_clip=None, layer_fisher="tanh",
                       stats_every=2, nystrom=None, weight_sharing="expand")]


def test_a_batchnorm_model_trains_with_its_statistics_in_the_carry():
  dataset = _random_dataset((12, 12), 10)
  task = bench.Task("resnet", lambda: dataset,
                    lambda: models.ResNet(blocks=1, widths=(4, 8)), 16,
                    epochs=1, target=0.0, scan=False)
  model = task.model()
  variables = model.init(jax.random.PRNGKey(0), dataset.x_train[:2])
  tx = bench.OPTIMIZERS["sngd"][0](0.1)
  chunk, evaluate = bench.make_chunk(task, model, tx, True)
  xs = dataset.x_train.reshape(4, 16, 12, 12)
  ys = dataset.y_train.reshape(4, 16)
  new, state, loss = chunk(jax.tree.map(np.copy, variables),
                           tx.init(variables["params"]), xs, ys)
  assert np.isfinite(float(loss))
  # BatchNorm's running statistics moved with the batches.
  before, after = (jax.tree.leaves(v["batch_stats"]) for v in (variables, new))
  assert all(not np.allclose(a, b) for a, b in zip(before, after))
  sngd_state = state[0]
  assert int(sngd_state.count) == 4 and float(sngd_state.stats_weight) > 0
  assert int(sngd_state.stats_faults) == 0
  assert np.isfinite(evaluate(new, dataset.x_val, dataset.y_val)[0])


def test_interleaved_runs_take_turns_and_equal_runs_one_after_another():
  order = []

  def chunks(name, count):
    for _ in range(count):
      order.append(name)
      yield
    return name

  assert bench.interleaved([chunks("a", 2), chunks("b", 3)]) == ["a", "b"]
  assert order == ["a", "b", "a", "b", "b"]

  dataset = _random_dataset((12,), 3)
  task = bench.Task("mlp", lambda: dataset, lambda: models.MLP((8,), outputs=3),
                    16, epochs=2, target=0.0)
  # SNGD twice: two runs of one compiled program must keep their own states.
  grid = [("sngd", 0.1), ("adam", 1e-2), ("sngd", 0.3)]
  alone = [bench.train(task, dataset, name, lr) for name, lr in grid]
  together = bench.interleaved(bench.training(task, dataset, name, lr)
                               for name, lr in grid)
  for one, other in zip(alone, together, strict=True):
    assert (one["optimizer"], one["lr"]) == (other["optimizer"], other["lr"])
    assert [h["train_loss"] for h in one["history"]] == [
        h["train_loss"] for h in other["history"]]
  assert len(alone[0]["history"]) == 9  # 4 chunks an epoch, and the start
  assert alone[0]["history"][-1]["train_loss"] != alone[2]["history"][-1]["train_loss"]


def test_time_to_target_is_the_first_of_a_tasks_measurements_at_the_target():
  dataset = _random_dataset((12,), 3)
  task = bench.Task("mlp-8-evals", lambda: dataset,
                    lambda: models.MLP((8,), outputs=3), 8, epochs=1,
                    target=0.0, evals_per_epoch=8)
  history = bench.train(task, dataset, "adam", 1e-2)["history"]
  assert [h["epoch"] for h in history] == [k / 8 for k in range(9)]
  losses = [h["train_loss"] for h in history]
  reached = bench.train(dataclasses.replace(task, target=losses[5]), dataset,
                        "adam", 1e-2)
  first = next(k for k, loss in enumerate(losses) if loss <= losses[5])
  assert reached["epochs_to_target"] == first / 8
  assert reached["time_to_target"] == reached["history"][first]["wall"] > 0


def test_a_loop_of_steps_trains_as_the_scan_does():
  # The CNN tasks run a jitted step in a loop (XLA:CPU's convolutions are
  # slow inside a scan's while loop); the two forms must take the same steps.
  dataset = _random_dataset((16, 1), 3, seed=1)
  scanned = bench.Task("cnn", lambda: dataset,
                       lambda: models.CNN((4, 4), kernel=3, outputs=3), 16,
                       epochs=2, target=0.0)
  looped = dataclasses.replace(scanned, name="cnn-loop", scan=False)
  for name in ("sngd", "adam"):
    one, other = (bench.train(task, dataset, name, 0.03)
                  for task in (scanned, looped))
    np.testing.assert_allclose([h["train_loss"] for h in one["history"]],
                               [h["train_loss"] for h in other["history"]],
                               rtol=1e-4)
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"]


def test_gpu_script_dry_run_prints_its_table():
  # benchmarks/gpu.py at tiny sizes, a few steps, on CPU: the script that
  # waits for a GPU runs end to end.
  import subprocess
  import sys
  from pathlib import Path

  script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
  result = subprocess.run([sys.executable, str(script), "--dry-run"],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line.split("|")[1].strip() for line in result.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| optimizer")]
  assert rows == ["sngd", "adamw", "muon"], result.stdout


def test_compile_and_step_benchmark_prints_a_row_per_model_and_optimizer():
  # benchmarks/compile_and_step.py on one-block GPTs, one step: the script
  # the README's compile-time numbers come from runs end to end.
  import subprocess
  import sys
  from pathlib import Path

  script = Path(__file__).parents[1] / "benchmarks" / "compile_and_step.py"
  result = subprocess.run(
      [sys.executable, str(script), "--blocks", "1", "--forms", "scanned",
       "--optimizers", "sngd", "adamw", "--steps", "1", "--warmup", "2"], capture_output=True,
      text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [[cell.strip() for cell in line.split("|")[1:3]]
          for line in result.stdout.splitlines() if "blocks, " in line]
  assert rows == [["1 blocks, scanned", "sngd"], ["1 blocks, scanned", "adamw"]
                  ], result.stdout


def test_python_sources_are_windows_of_the_standard_library():
  dataset = data.python_sources(context=32, characters=200_000)
  assert dataset.x_train.shape[1] == 32
  np.testing.assert_array_equal(dataset.x_train[:, 1:], dataset.y_train[:, :-1])
  assert dataset.name.endswith("-sources")
  text = "".join(data.CHARACTERS[c] for c in dataset.x_train[:300].ravel())
  assert "def " in text and "return" in text, text[:500]


def test_factorization_flops_are_the_textbook_counts_of_the_compiled_calls():
  """``flops.custom_call_flops`` reads each LAPACK call of a compiled program
  with its shapes: a batch of 3 Cholesky factorizations of 64 x 64, an eigh
  of 40 x 40 and a QR of 100 x 20 (factored, then its Q formed)."""
  import jax.numpy as jnp

  from sngd_jax.bench import flops

  def count(function, *shapes):
    args = [jnp.ones(shape) for shape in shapes]
    return flops.custom_call_flops(jax.jit(function).lower(*args).compile().as_text())

  assert count(jnp.linalg.cholesky, (3, 64, 64)) == 3 * 64 ** 3 / 3
  assert count(lambda a: jnp.linalg.eigh(a)[1], (40, 40)) == 9 * 40 ** 3
  assert count(lambda a: jnp.linalg.qr(a)[0], (100, 20)) == 2 * (
      2 * 100 * 20 ** 2 - 2 * 20 ** 3 / 3)
