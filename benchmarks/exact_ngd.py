"""The exact natural gradient on the MNIST-1D GRU, against Adam and SNGD.

The benchmark's GRU task (GRU(32) over 40 steps, a dense head, gradients
clipped at norm 1) has 3626 parameters, so its whole Fisher (the softmax's
GGN ``E[J^T H J]``) fits in memory. This runs natural gradient descent with
it, with SNGD's damping, condition cap, heavy-ball momentum and KL clip
(``lr^2 m^T F m <= budget``), and a warm start (the Fisher of 10 batches at
the initial weights), on the same batches as Adam's and SNGD's runs of the
same seed: the ceiling of what any approximation of the natural gradient
could gain there. ``--blocks layers`` keeps only each layer's block of the
Fisher (the best a layer-local method can do); ``--blocks cell`` joins the
cell's layers that read the same input. Prints the train loss every quarter
epoch and the epochs to the task's target (docs/experiments.md, "The GRU's
ceiling"). About 2 minutes a run on 2 cores.

    python benchmarks/exact_ngd.py ngd --lr 1.0 --budget 0.01 [--blocks layers]
    python benchmarks/exact_ngd.py adam --lr 0.03
    python benchmarks/exact_ngd.py sngd --lr 0.1
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import sngd_jax
from sngd_jax.bench import harness

STATS_EVERY, REFRESH_EVERY, EMA_DECAY, WARM_BATCHES = 5, 20, 0.9, 10
RELATIVE_DAMPING, DAMPING, MAX_CONDITION, MOMENTUM = 1e-2, 1e-4, 1e3, 0.9


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("optimizer", choices=("ngd", "adam", "sngd"))
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--budget", type=float, default=0.01,
                      help="ngd's KL clip: lr^2 m^T F m <= budget")
  parser.add_argument("--blocks", choices=("full", "layers", "cell"),
                      default="full")
  parser.add_argument("--epochs", type=float, default=4.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  task = next(t for t in harness.tasks("full", False)
              if t.name == "mnist1d-gru")
  data = task.dataset()
  model = task.model()
  params = model.init(jax.random.PRNGKey(args.seed),
                      data.x_train[:2])["params"]
  loss = harness.loss_fn(task)
  evaluate = harness.make_evaluate(task, model)
  batches = np.random.default_rng(args.seed)
  steps_per_epoch = len(data.x_train) // task.batch_size

  def batch(order, index):
    rows = order[index * task.batch_size:(index + 1) * task.batch_size]
    return data.x_train[rows], data.y_train[rows].astype(np.int32)

  # Drawn for every optimizer, so that all train on the same batches.
  warm = batches.permutation(len(data.x_train))
  if args.optimizer == "ngd":
    step = ngd_step(model, loss, params, task.clip, args,
                    [batch(warm, i) for i in range(WARM_BATCHES)])
  else:
    step = optax_step(model, loss, params, task.clip, args)

  history, reached = [], None
  for index in range(int(args.epochs * steps_per_epoch)):
    if index % steps_per_epoch == 0:
      order = batches.permutation(len(data.x_train))
    params = step(params, *batch(order, index % steps_per_epoch))
    if (index + 1) % (steps_per_epoch // 4) == 0:
      value = float(evaluate({"params": params}, data.x_train,
                             data.y_train.astype(np.int32))[0])
      history.append(value)
      if reached is None and value <= task.target:
        reached = (index + 1) / steps_per_epoch
  print(f"{args.optimizer} lr {args.lr} seed {args.seed}"
        + (f" budget {args.budget} blocks {args.blocks}"
           if args.optimizer == "ngd" else "")
        + f": epochs to target {reached}; train loss each quarter epoch "
        + " ".join(f"{value:.2f}" for value in history))


def optax_step(model, loss, params, clip, args):
  """A step of the benchmark's Adam or SNGD (``harness.OPTIMIZERS``)."""
  tx = optax.chain(optax.clip_by_global_norm(clip),
                   harness.OPTIMIZERS[args.optimizer][0](args.lr))
  state = [tx.init(params)]
  needs_activations = args.optimizer == "sngd"

  def objective(params, x, y):
    if needs_activations:
      logits, acts = sngd_jax.linen_capture(model, {"params": params}, x)
    else:
      logits, acts = model.apply({"params": params}, x), None
    return loss(logits, x, y), acts

  @jax.jit
  def update(params, state, x, y):
    grads, acts = jax.grad(objective, has_aux=True)(params, x, y)
    extra = {"activations": acts} if needs_activations else {}
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  def step(params, x, y):
    params, state[0] = update(params, state[0], x, y)
    return params

  return step


def ngd_step(model, loss, params, clip, args, warm):
  """A step of natural gradient descent with the model's whole GGN."""
  _, unravel = ravel_pytree(params)

  def logits(w, x):
    return model.apply({"params": unravel(w)}, x)

  @jax.jit
  def gradient(w, x, y):
    g = jax.grad(lambda w: loss(logits(w, x), x, y))(w)
    return g * jnp.minimum(1.0, clip / jnp.linalg.norm(g))

  @jax.jit
  def fisher(w, x):  # E[J^T (diag(p) - p p^T) J] over the batch
    jacobian = jax.jacrev(logits)(w, x)  # (batch, classes, parameters)
    p = jax.nn.softmax(logits(w, x))
    hj = p[..., None] * (jacobian - jnp.einsum("bk,bkd->bd", p,
                                               jacobian)[:, None])
    return jnp.einsum("bkd,bke->de", hj, jacobian) / x.shape[0]

  mask = block_mask(params, args.blocks)
  w0 = ravel_pytree(params)[0]
  state = dict(fisher=sum(fisher(w0, x) for x, _ in warm) / len(warm),
               momentum=jnp.zeros_like(w0), count=0)

  def step(params, x, y):
    w, count = ravel_pytree(params)[0], state["count"]
    if count % STATS_EVERY == 0:
      state["fisher"] = (EMA_DECAY * state["fisher"]
                         + (1 - EMA_DECAY) * fisher(w, x))
    if count % REFRESH_EVERY == 0:
      values, vectors = np.linalg.eigh(
          np.asarray(state["fisher"] * mask, np.float32))
      values = (np.maximum(values, 0) + RELATIVE_DAMPING * values.mean()
                + DAMPING)
      values = np.maximum(values, values.max() / MAX_CONDITION)
      state["inverse"] = jnp.asarray((vectors / values) @ vectors.T)
      state["damped"] = jnp.asarray((vectors * values) @ vectors.T)
    m = MOMENTUM * state["momentum"] + state["inverse"] @ gradient(w, x, y)
    kl = args.lr ** 2 * float(m @ (state["damped"] @ m))
    if kl > args.budget:
      m = m * np.sqrt(args.budget / kl)
    state.update(momentum=m, count=count + 1)
    return unravel(w - args.lr * m)

  return step


def block_mask(params, blocks):
  """1 where two parameters' Fisher entry is kept, by ``--blocks``."""
  def group(path):
    names = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
    if blocks == "cell" and "Cell" in names:  # the layers reading h, and x
      names = names.rsplit("/", 1)[0] + "/" + names.rsplit("/", 1)[1][0]
    return names

  groups = [group(path) for path, _ in
            jax.tree_util.tree_flatten_with_path(params)[0]]
  sizes = [x.size for x in jax.tree.leaves(params)]
  ids = np.repeat(np.unique(groups, return_inverse=True)[1], sizes)
  if blocks == "full":
    return jnp.ones((ids.size, ids.size), jnp.float32)
  return jnp.asarray(ids[:, None] == ids[None, :], jnp.float32)


if __name__ == "__main__":
  main()
