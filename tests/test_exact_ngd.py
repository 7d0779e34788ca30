"""SNGD's update against explicit float64 constructions of each local Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import cross_entropy, mlp_forward, mlp_params

import sngd_jax

DAMPING, RELATIVE = 1e-3, 1e-2
# The bare formula: one batch's statistic (no EMA), inverted at once, exact
# blocks, no KL clip, no condition cap (test_the_cap_... adds it), the input
# side alone (test_output_factor adds the
# output side): what the references below compute.
FORMULA = dict(ema_decay=0.0, damping=DAMPING, relative_damping=RELATIVE,
               max_condition=None, stats_every=1, inverse_every=1,
               nystrom=None, kl_clip=None, stats_positions=None,
               output_factor=False)

# Independent numpy versions of nu_f from the method note.
NU = {
    "relu": lambda h: (1 / (1 + np.exp(-h))) ** 2,
    "sigmoid": lambda h: (1 / (1 + np.exp(-h))) * (1 - 1 / (1 + np.exp(-h))),
    "tanh": lambda h: 1 - np.tanh(h) ** 2,
    "elu": lambda h: np.where(h >= 0, 1.0, np.exp(np.minimum(h, 0)) ** 2),
}


def damp(g, trace=None, dim=None, largest=None, max_condition=None):
  """``g + (damping + relative * trace / dim + largest / max_condition) I``;
  by default g's own trace, size and largest eigenvalue, and no cap."""
  trace = np.trace(g) if trace is None else trace
  dim = g.shape[0] if dim is None else dim
  shift = DAMPING + RELATIVE * trace / dim
  if max_condition is not None:
    largest = np.linalg.eigvalsh(g)[-1] if largest is None else largest
    shift += largest / max_condition
  return g + shift * np.eye(g.shape[0])


def with_ones(x):
  return np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)


def reference_update(kind, x, h, g, max_condition=None):
  """``G^{-1} g`` for one layer; ``g`` is ``(d_in + 1, d_out)``."""
  xt = with_ones(np.asarray(x))
  h = np.asarray(h)
  n = xt.shape[0]
  if kind == "linear":
    return np.linalg.solve(damp(xt.T @ xt / n, max_condition=max_condition), g)
  if kind == "softmax":
    eta = np.exp(h - h.max(1, keepdims=True))
    eta /= eta.sum(1, keepdims=True)
    a = np.diag(eta.mean(0)) - eta.T @ eta / n
    b = xt.T @ xt / n
    big = damp(np.kron(a, b), max_condition=max_condition)  # index (unit j, feature i) = vec(g) by columns
    return np.linalg.solve(big, g.T.reshape(-1)).reshape(g.shape[1], -1).T
  # Per unit: the damping is the layer's (its block-diagonal Fisher's trace
  # and largest eigenvalue).
  nu = NU[kind](h)
  blocks = [(xt * nu[:, j:j + 1]).T @ xt / n for j in range(g.shape[1])]
  trace = sum(np.trace(b) for b in blocks)
  dim = len(blocks) * xt.shape[1]
  largest = max(np.linalg.eigvalsh(b)[-1] for b in blocks)
  return np.stack([np.linalg.solve(damp(b, trace, dim, largest, max_condition),
                                   g[:, j]) for j, b in enumerate(blocks)],
                  axis=1)


def one_step(kind, solver, params, acts, grads, max_condition=None):
  tx = sngd_jax.scale_by_sngd(**{**FORMULA, "max_condition": max_condition},
                              layer_fisher=kind, solver=solver)
  state = tx.init(params)
  updates, state = jax.jit(
      lambda g, s, p, a: tx.update(g, s, p, activations=a))(
          grads, state, params, acts)
  return updates, state


def stacked(layer):
  return np.concatenate([np.asarray(layer["kernel"]),
                         np.asarray(layer["bias"])[None]], axis=0)


@pytest.mark.parametrize("solver", ["cholesky", "eigh", "denman_beavers"])
@pytest.mark.parametrize("kind", ["linear", "relu", "sigmoid", "tanh", "elu",
                                  "softmax"])
def test_update_is_damped_local_fisher_inverse_times_gradient(kind, solver):
  key = jax.random.PRNGKey(0)
  params = mlp_params(key, [4, 5, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 4), jnp.float64)
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0])
  loss = lambda p: cross_entropy(mlp_forward(p, x)[0], labels)
  grads = jax.grad(loss)(params)
  _, acts = mlp_forward(params, x)
  updates, state = one_step(kind, solver, params, acts, grads)
  for name in params:
    expected = reference_update(kind, acts[name]["inputs"],
                                acts[name]["outputs"], stacked(grads[name]))
    np.testing.assert_allclose(stacked(updates[name]), expected,
                               rtol=1e-9, atol=1e-9)
  assert int(state.stats_faults) == 0 and int(state.inverse_faults) == 0


@pytest.mark.parametrize("kind", ["linear", "relu", "softmax"])
def test_the_cap_adds_the_largest_eigenvalue_over_max_condition(kind):
  """With ``max_condition`` 10 the cap outweighs the relative damping 45-57x
  (the linear blocks here)."""
  params = mlp_params(jax.random.PRNGKey(0), [4, 5, 3])
  x = 2.0 + jax.random.normal(jax.random.PRNGKey(1), (7, 4), jnp.float64)
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0])
  grads = jax.grad(lambda p: cross_entropy(mlp_forward(p, x)[0], labels))(params)
  _, acts = mlp_forward(params, x)
  updates, _ = one_step(kind, "cholesky", params, acts, grads, max_condition=10.0)
  for name in params:
    capped, bare = (reference_update(kind, acts[name]["inputs"],
                                     acts[name]["outputs"], stacked(grads[name]),
                                     cap) for cap in (10.0, None))
    assert np.linalg.norm(capped - bare) > 0.1 * np.linalg.norm(bare)
    np.testing.assert_allclose(stacked(updates[name]), capped, rtol=1e-6,
                               atol=1e-9)


def test_per_layer_mapping_like_the_official_code():
  """First and last layers linear, hidden layers per-unit ReLU."""
  params = mlp_params(jax.random.PRNGKey(0), [4, 6, 5, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (9, 4), jnp.float64)
  _, acts = mlp_forward(params, x)
  grads = jax.tree.map(lambda p: jnp.cos(p), params)
  kinds = {"layer0": "linear", "layer1": "relu", "layer2": "linear"}
  tx = sngd_jax.scale_by_sngd(**FORMULA, layer_fisher=kinds)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  for name, kind in kinds.items():
    expected = reference_update(kind, acts[name]["inputs"],
                                acts[name]["outputs"], stacked(grads[name]))
    np.testing.assert_allclose(stacked(updates[name]), expected, rtol=1e-9,
                               atol=1e-9)


def _exact_fisher(model, w, x, output_covariance):
  """Fisher E_x[J^T C J] of a model's outputs from autodiff Jacobians."""
  flat, unravel = jax.flatten_util.ravel_pytree(w)
  jac = jax.vmap(lambda xi: jax.jacobian(
      lambda f: model(unravel(f), xi[None])[0])(flat))(x)  # (N, out, P)
  cov = jax.vmap(output_covariance)(jax.vmap(
      lambda xi: model(w, xi[None])[0])(x))
  return np.asarray(jnp.einsum("nop,noq,nqr->pr", jac, cov, jac) / x.shape[0]), unravel


def _exact_ngd(fisher_matrix, grads):
  flat, unravel = jax.flatten_util.ravel_pytree(grads)
  return unravel(jnp.asarray(np.linalg.solve(damp(fisher_matrix), np.asarray(flat))))


def test_linear_kind_is_exact_ngd_for_least_squares():
  """For a dense layer under a Gaussian likelihood, the Fisher is E[x~x~^T] (x) I."""
  import jax.flatten_util  # noqa: F401
  w = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (5, 3)),
       "bias": jnp.arange(3.0)}
  x = jax.random.normal(jax.random.PRNGKey(1), (11, 5))
  y = jax.random.normal(jax.random.PRNGKey(2), (11, 3))
  model = lambda w, x: x @ w["kernel"] + w["bias"]
  grads = jax.grad(lambda w: 0.5 * jnp.mean(jnp.sum((model(w, x) - y) ** 2, 1)))(w)
  # Params flatten as (bias, kernel) rows; the identity output covariance.
  fisher_matrix, _ = _exact_fisher(model, w, x, lambda out: jnp.eye(3))
  expected = _exact_ngd(fisher_matrix, grads)
  tx = sngd_jax.scale_by_sngd(**FORMULA)
  updates, _ = tx.update({"dense": grads}, tx.init({"dense": w}), {"dense": w},
                         activations={"dense": {"inputs": x}})
  # The damping's trace term differs by the factor dim: trace(G (x) I)/dim is
  # trace(G)/dim_G. Same shift, so the solutions agree exactly.
  for name in w:
    np.testing.assert_allclose(updates["dense"][name], expected[name],
                               rtol=1e-9, atol=1e-9)


def test_softmax_kind_is_exact_ngd_for_one_example():
  """With a single example the Kronecker factorization is the exact Fisher."""
  import jax.flatten_util  # noqa: F401
  w = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (4, 3)),
       "bias": jnp.array([0.1, -0.2, 0.3])}
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 4))
  model = lambda w, x: x @ w["kernel"] + w["bias"]
  grads = jax.grad(lambda w: cross_entropy(model(w, x), jnp.array([2])))(w)
  softmax_cov = lambda logits: (jnp.diag(jax.nn.softmax(logits))
                                - jnp.outer(jax.nn.softmax(logits),
                                            jax.nn.softmax(logits)))
  fisher_matrix, _ = _exact_fisher(model, w, x, softmax_cov)
  expected = _exact_ngd(fisher_matrix, grads)
  tx = sngd_jax.scale_by_sngd(**FORMULA, layer_fisher="softmax")
  acts = {"out": {"inputs": x, "outputs": model(w, x)}}
  updates, _ = tx.update({"out": grads}, tx.init({"out": w}), {"out": w},
                         activations=acts)
  for name in w:
    np.testing.assert_allclose(updates["out"][name], expected[name],
                               rtol=1e-8, atol=1e-9)


def test_ema_is_bias_corrected_and_shrunk_toward_its_mean_eigenvalue():
  """After k batches, G = w S + (1 - w) (tr S / n) I with w = 1 - decay^k.

  S is the bias-corrected average of the batch statistics: the EMA starts at
  zero, and the missing weight goes to the scaled identity, whatever the
  inputs' scale.
  """
  params = mlp_params(jax.random.PRNGKey(0), [3, 2])
  tx = sngd_jax.scale_by_sngd(**{**FORMULA, "ema_decay": 0.75})
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  batches = [10 * jax.random.normal(jax.random.PRNGKey(i), (5, 3))
             for i in range(3)]
  raw = np.zeros((4, 4))
  for k, x in enumerate(batches, start=1):
    _, acts = mlp_forward(params, x)
    _, state = tx.update(grads, state, params, activations=acts)
    xt = with_ones(np.asarray(x))
    raw = 0.75 * raw + 0.25 * xt.T @ xt / 5
    weight = 1 - 0.75 ** k
    average = raw / weight
    shrunk = weight * average + (1 - weight) * np.trace(average) / 4 * np.eye(4)
    np.testing.assert_allclose(state.stats["layer0"], raw, rtol=1e-12)
    np.testing.assert_allclose(float(state.stats_weight), weight, rtol=1e-6)
    np.testing.assert_allclose(state.preconditioners["layer0"],
                               np.linalg.inv(damp(shrunk)), rtol=1e-5)


def test_stats_every_and_inverse_every_skip_work_between_refreshes():
  params = mlp_params(jax.random.PRNGKey(0), [3, 2])
  tx = sngd_jax.scale_by_sngd(**{**FORMULA, "stats_every": 2,
                                 "inverse_every": 3})
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  history = []
  for i in range(6):
    x = jax.random.normal(jax.random.PRNGKey(i), (5, 3))
    _, acts = mlp_forward(params, x)
    _, state = tx.update(grads, state, params, activations=acts)
    history.append((np.asarray(state.stats["layer0"]),
                    np.asarray(state.preconditioners["layer0"])))
  stats_changed = [not np.array_equal(history[i][0], history[i - 1][0])
                   for i in range(1, 6)]
  precond_changed = [not np.array_equal(history[i][1], history[i - 1][1])
                     for i in range(1, 6)]
  assert stats_changed == [False, True, False, True, False]  # steps 2 and 4
  assert precond_changed == [False, False, True, False, False]  # step 3


def test_reconstruction_theorem_gd_on_reparametrized_network_is_ngd():
  """10 steps of GD on w' = G^{1/2} w equal 10 steps of SNGD with G held fixed."""
  params = mlp_params(jax.random.PRNGKey(0), [4, 6, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 4), jnp.float64)
  labels = jnp.arange(16) % 3
  lr, steps = 0.3, 10

  # Ours: refresh only at step 0 so G stays the first step's statistic.
  tx = sngd_jax.sngd(lr, **{**FORMULA, "inverse_every": 1000})
  state = tx.init(params)
  w = params
  for _ in range(steps):
    _, acts = mlp_forward(w, x)
    grads = jax.grad(lambda p: cross_entropy(mlp_forward(p, x)[0], labels))(w)
    updates, state = tx.update(grads, state, w, activations=acts)
    w = optax.apply_updates(w, updates)

  # Reference: the reconstructed network, each layer's x~ through G^{-1/2}.
  _, acts0 = mlp_forward(params, x)
  roots = {}
  for name in params:
    xt = with_ones(np.asarray(acts0[name]["inputs"]))
    vals, vecs = np.linalg.eigh(damp(xt.T @ xt / xt.shape[0]))
    roots[name] = (vecs * np.sqrt(vals) @ vecs.T, vecs / np.sqrt(vals) @ vecs.T)

  def original(reparam):
    out = {}
    for name, (_, inv_root) in roots.items():
      stacked_w = inv_root @ reparam[name]
      out[name] = {"kernel": stacked_w[:-1], "bias": stacked_w[-1]}
    return out

  reparam = {name: roots[name][0] @ stacked(params[name]) for name in params}
  reparam_loss = lambda r: cross_entropy(mlp_forward(original(r), x)[0], labels)
  for _ in range(steps):
    reparam = jax.tree.map(lambda r, g: r - lr * g, reparam,
                           jax.grad(reparam_loss)(reparam))
  expected = original(reparam)
  for name in params:
    np.testing.assert_allclose(stacked(w[name]), stacked(expected[name]),
                               rtol=1e-9, atol=1e-10)


def test_nystrom_block_against_its_explicit_construction():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 30)) * np.linspace(0.2, 3.0, 30)
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(30, 4))),
                      "bias": jnp.zeros(4)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
  acts = {"dense": {"inputs": jnp.asarray(x)}}
  tx = sngd_jax.scale_by_sngd(**{**FORMULA,
                                 "nystrom": sngd_jax.Nystrom(rank=6, min_dim=8)})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)

  xt = with_ones(x)
  g = xt.T @ xt / len(xt)
  columns = np.array(sngd_jax.fisher.NystromLinear.for_width(
      31, 6, bias=True).columns)
  assert 30 in columns  # the bias column is always sampled
  approx = g[:, columns] @ np.linalg.pinv(g[np.ix_(columns, columns)]) @ g[columns]
  spectral = (np.trace(g) - np.trace(approx)) / (31 - 6)
  shift = DAMPING + RELATIVE * np.trace(g) / 31 + spectral
  stacked_grads = np.concatenate([grads["dense"]["kernel"],
                                  grads["dense"]["bias"][None]])
  expected = np.linalg.solve(approx + shift * np.eye(31), stacked_grads)
  np.testing.assert_allclose(updates["dense"]["kernel"], expected[:-1],
                             rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(updates["dense"]["bias"], expected[-1],
                             rtol=1e-8, atol=1e-12)
