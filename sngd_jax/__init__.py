"""sngd-jax: structured natural gradient descent as an Optax transform."""

from sngd_jax.fisher import KINDS
from sngd_jax.linalg import denman_beavers
from sngd_jax.transform import Nystrom, ScaleBySNGDState, scale_by_sngd, sngd

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Nystrom",
    "ScaleBySNGDState",
    "denman_beavers",
    "scale_by_sngd",
    "sngd",
]
