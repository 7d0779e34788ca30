from sngd_jax.bench.harness import main

main()
