import atexit
import os
import shutil
import tempfile

import jax

# Numbers are compared in float64; float32/bfloat16 tests ask for their dtype.
jax.config.update("jax_enable_x64", True)

# XLA's compile time dominates the suite (the update is one program per model
# and setting), so the tests, and the interpreters and notebook kernels they
# start (they inherit the environment), compile with most optimizations off
# and share one compilation cache, made for this run: the same program built
# by another test or worker is read back instead of compiled. Every comparison
# has a tolerance; the benchmark and the demo compile with the defaults.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
# XLA:CPU's fusion emitters compile the update's many small fusions ~3x
# slower than its older elemental emitters (jax 0.10.2: a 2-block GPT's
# update 3.5 s against 1.2 s); the tests run the older ones.
# (The workers inherit the controller's flags.)
if "--xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      (os.environ.get("XLA_FLAGS", ""), "--xla_cpu_use_fusion_emitters=false")).strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # pytest-xdist's controller
  cache = tempfile.mkdtemp(prefix="sngd-jax-tests-")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
jax.config.update("jax_disable_most_optimizations", True)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The longest tests (subprocesses, notebooks) first: pytest-xdist hands tests
# out in this order, one at a time (`make test` passes --maxschedchunk 1), so
# its two workers finish together.
LONGEST = ("test_sharding", "test_notebooks", "test_readme", "test_bench")


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.module.__name__ not in LONGEST)
