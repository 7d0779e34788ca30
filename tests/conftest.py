import jax

# Numbers are compared in float64; float32/bfloat16 tests ask for their dtype.
jax.config.update("jax_enable_x64", True)
