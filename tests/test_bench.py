"""Smoke run of the benchmark CLI: a few steps per optimizer, every output written."""

import json

from sngd_jax.bench import harness as bench


def test_bench_smoke_writes_tables_plots_and_json(tmp_path, capsys):
  bench.main(["--tasks", "mnist1d-mlp", "--steps", "40", "--out", str(tmp_path),
              "--optimizers", *bench.OPTIMIZERS,
              "--sngd-variants", "kl_clip=1.0,stats_every=2"])
  report = json.loads((tmp_path / "results.json").read_text())
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
  assert "step time vs Adam" in capsys.readouterr().out
