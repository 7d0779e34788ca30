from sngd_jax.bench import main

main()
