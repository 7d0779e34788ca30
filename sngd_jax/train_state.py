"""A Flax linen ``TrainState`` whose ``apply_gradients`` forwards activations."""

from __future__ import annotations

import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` for a ``tx`` that takes activations (SNGD's).

  Flax's ``apply_gradients(grads=...)`` calls ``tx.update(grads, opt_state,
  params)`` without extra arguments; this one passes ``activations=`` on.
  ``create``, ``replace``, serialization and every other field are Flax's.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sngd_jax
    >>> from flax import linen as nn
    >>> model = nn.Dense(3)
    >>> x, y = jnp.ones((8, 4)), jnp.zeros(8, jnp.int32)
    >>> state = sngd_jax.TrainState.create(
    ...     apply_fn=model.apply, tx=sngd_jax.sngd(0.1),
    ...     params=model.init(jax.random.key(0), x)["params"])
    >>> def loss_fn(params):
    ...   logits, acts = sngd_jax.linen_capture(model, {"params": params}, x)
    ...   loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    ...   return loss.mean(), acts
    >>> (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    ...     state.params)
    >>> state = state.apply_gradients(grads=grads, activations=acts)
    >>> int(state.step)
    1
  """

  def apply_gradients(self, *, grads, activations=None, **kwargs):
    """One step: ``tx.update(grads, opt_state, params, activations=...)``.

    Args:
      grads: the loss's gradients with respect to ``params``.
      activations: the layers' activations of the same forward pass
        (``sngd_jax.linen_capture``'s second result).
      **kwargs: other fields to replace, as in Flax's ``apply_gradients``.

    Returns:
      The state after the step, its ``step`` counted up by one.
    """
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        activations=activations)
    return self.replace(step=self.step + 1,
                        params=optax.apply_updates(self.params, updates),
                        opt_state=opt_state, **kwargs)
