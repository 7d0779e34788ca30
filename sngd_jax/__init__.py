"""sngd-jax: structured natural gradient descent as an Optax transform."""

from sngd_jax.capture import (
    conv_patches,
    dense,
    linen_capture,
    nnx_capture,
    with_position_mask,
)
from sngd_jax.fisher import KINDS
from sngd_jax.linalg import denman_beavers
from sngd_jax.train_state import TrainState
from sngd_jax.transform import (
    Nystrom,
    ScaleBySNGDState,
    layer_slice,
    scale_by_sngd,
    sngd,
)

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Nystrom",
    "ScaleBySNGDState",
    "TrainState",
    "conv_patches",
    "dense",
    "denman_beavers",
    "layer_slice",
    "linen_capture",
    "nnx_capture",
    "scale_by_sngd",
    "sngd",
    "with_position_mask",
]
