"""Data-parallel and parameter-sharded SNGD match one device (8 simulated CPUs)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def run_check(script: str) -> dict:
  """Runs ``tests/<script>`` on 8 simulated CPU devices; its JSON report."""
  here = Path(__file__).parent
  env = dict(os.environ, XLA_FLAGS=" ".join((
                 os.environ.get("XLA_FLAGS", ""),
                 "--xla_force_host_platform_device_count=8")).strip(),
             PYTHONPATH=f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             JAX_PLATFORMS="cpu")
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
    check = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", str(here / script)],
        stdout=out, stderr=err, text=True, env=env)
    try:
      check.wait(timeout=600)
    except subprocess.TimeoutExpired:
      check.send_signal(signal.SIGABRT)  # faulthandler: where each thread is
      check.wait()
      err.seek(0)
      raise AssertionError(f"hung (600 s):\n{err.read()[-3000:]}") from None
    out.seek(0)
    err.seek(0)
    assert check.returncode == 0, err.read()[-3000:]
    return json.loads(out.read().strip().splitlines()[-1])


def test_sharded_training_matches_single_device():
  report = run_check("sharding_check.py")
  assert report["data_parallel"] < 1e-5, report
  assert report["param_sharded"] < 1e-5, report
  # pmap with axis_name: every replica identical, equal to one device.
  assert report["pmap"] < 1e-5, report
  assert report["pmap_spread"] == 0.0, report
  assert report["shard_map"] < 1e-5, report
  assert report["explicit_mesh"] < 1e-5, report
  assert report["kernel_sharding"] == [None, "data"], report
  # refresh_axis: the same training, the refresh divided among the devices
  # (jit on 8 and on 2 devices, explicit mesh, pmap, shard_map).
  for name in ("split_jit_8", "split_jit_2", "split_explicit", "split_pmap",
               "split_shard_map"):
    assert report[name] < 1e-5, (name, report)
  # Two models under vmap (vmap_axis_name), refresh divided: each as alone.
  assert report["split_vmap"] < 1e-5, report
  assert report["split_faults"] == 0, report
  # Every block kind's divided refresh equals its whole one, and so do the
  # output factors' roots, divided by factor.
  kinds = [name for name in report["kinds_gap"] if "/output" not in name]
  assert len(kinds) == 9, report
  assert len(report["kinds_gap"]) > 9, report
  assert max(report["kinds_gap"].values()) < 1e-5, report
  assert report["low_rank_gap"] < 1e-5, report
  # Each of 8 devices does at most a quarter of one device's input-block
  # refresh FLOPs; with the output factors' roots (two of each size at most
  # here, each on one device) at most 0.65 (0.98 when every device computed
  # every root).
  assert report["refresh_flops_ratio"] <= 0.25, report
  assert report["refresh_flops_ratio_all"] <= 0.65, report
  # The default refresh_axis="auto" divides it under a one-axis mesh, as
  # naming the axis does (this small MLP's per-device factorizations: its
  # two output factors, one of each size, stay whole).
  assert report["auto_flops_ratio"] == report["named_flops_ratio"], report
  assert report["auto_flops_ratio"] < 0.9, report
  assert report["batch_devices"] == 8, report


def test_tensor_parallel_explicit_meshes_match_single_device():
  # The Flax MiniGPT tutorial's annotations (kernels split over "model"
  # along their outputs or inputs) under (4, 2) and (2, 4) Explicit meshes.
  report = run_check("tensor_parallel_check.py")
  assert set(report) == {"4x2", "2x4"}, report
  assert max(report.values()) < 1e-4, report
