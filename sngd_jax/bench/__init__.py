"""The benchmark: tasks, offline datasets, models, peers and the CLI.

Not imported by ``sngd_jax``: the library does not carry it. Run it with
``python -m sngd_jax.bench`` (``harness.main``); ``harness`` holds the
training loop the scripts in ``benchmarks/`` share.
"""
