"""What the KL clip bounds, against the exact Fisher (float64).

The clip bounds ``lr^2 v . g``, the step's squared length in the blocks'
metric (``v = P g``, ``P`` the block-diagonal preconditioner). Twice the
step's KL is about ``lr^2 v^T F v`` with ``F`` the exact Fisher of the
categorical likelihood, ``E[J^T (diag(p) - p p^T) J]`` over the batch
(``J`` the logits' Jacobian, applied by ``jax.jvp``). Their ratio
``v^T F v / v . g`` is what a clipped step's 2 KL is in units of
``kl_clip``: measured here for each kind along a short training run, and
stated in docs/guide.md (Step-size control).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import blobs, loss_and_acts, mlp_forward, mlp_params

import sngd_jax

KINDS = {
    "linear": (jnp.tanh, {}),
    "tanh": (jnp.tanh, {"layer0": "tanh", "layer1": "tanh"}),
    "relu": (jax.nn.relu, {"layer0": "relu", "layer1": "relu"}),
    "softmax": (jnp.tanh, {"layer2": "softmax"}),
}


def ratios(kind, steps=40, lr=0.1, batch=32):
  """``v^T F v / v . g`` at each step of training with the defaults
  (unclipped, so that every step is measured alike)."""
  activation, layer_fisher = KINDS[kind]
  params = mlp_params(jax.random.PRNGKey(0), [6, 12, 12, 4])
  x, labels = blobs(jax.random.PRNGKey(1), n=steps * batch, d=6)
  tx = sngd_jax.scale_by_sngd(kl_clip=None, layer_fisher=layer_fisher)
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, labels):
    (_, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
        params, x, labels, activation)
    v, state = tx.update(grads, state, params, activations=acts)
    logits, jv = jax.jvp(lambda p: mlp_forward(p, x, activation)[0],
                         (params,), (v,))
    p = jax.nn.softmax(logits)
    exact = jnp.mean(jnp.sum(p * jv ** 2, -1) - jnp.sum(p * jv, -1) ** 2)
    vg = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v),
                                             jax.tree.leaves(grads)))
    params = jax.tree.map(lambda w, d: w - lr * d, params, v)
    return params, state, exact / vg

  out = []
  for t in range(steps):
    rows = slice(t * batch, (t + 1) * batch)
    params, state, ratio = step(params, state, x[rows], labels[rows])
    out.append(float(ratio))
  return np.array(out)


# Measured (2026-12-06): median and largest ratio over the 40 steps. Each
# band is within 2x of it, so a change in what the clip measures (or in a
# kind's block) shows here.
MEASURED = {"linear": (0.60, 1.32), "tanh": (0.96, 1.75),
            "relu": (1.81, 4.96), "softmax": (9.24, 73.0)}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_what_the_clip_bounds_against_the_exact_fisher(kind):
  measured = ratios(kind)
  median, largest = MEASURED[kind]
  assert median / 2 < np.median(measured) < 2 * median, measured
  assert largest / 2 < measured.max() < 2 * largest, measured
