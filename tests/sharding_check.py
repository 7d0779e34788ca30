"""Run by test_sharding.py in a subprocess with 8 simulated CPU devices.

Prints the largest relative difference between single-device training and
(a) data-parallel training (batch sharded, params replicated) and
(b) params sharded by NamedSharding along their output axis, and under
pmap, shard_map (both with ``axis_name``) and an explicit-sharding mesh; then
the refresh divided among the devices (``refresh_axis``) in each style, and
the per-device FLOPs of that refresh against one device's.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from helpers import (
  blobs,
  every_block_kind,
  loss_and_acts,
  mlp_forward,
  mlp_params,
)
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import sngd_jax
from sngd_jax import transform
from sngd_jax.bench import flops

assert jax.device_count() == 8, jax.devices()
START = time.perf_counter()


def stage(name):
  # Progress on stderr: a run that times out shows where it stopped.
  print(f"{time.perf_counter() - START:7.1f}s {name}", file=sys.stderr, flush=True)


def rel(a, b):
  return max(float(jnp.linalg.norm(np.asarray(u) - np.asarray(v)) / jnp.linalg.norm(np.asarray(v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


params = mlp_params(jax.random.PRNGKey(0), [16, 32, 8], jnp.float32)
x, labels = blobs(jax.random.PRNGKey(1), n=64, d=16, classes=8, dtype=jnp.float32)
# No KL clip: a clipped step has the same length whatever the gradient's
# scale, so it would hide a gradient summed instead of averaged.
tx = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=2, kl_clip=None,
                   layer_fisher={"layer0": "relu", "*": "linear"})


def step(params, state, x, labels):
  (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state, loss


def train(params, x, labels, jitted):
  # One program at a time (init, then each step): XLA:CPU (jax 0.10.2) can
  # deadlock in a collective when consecutive multi-device programs overlap
  # on a loaded machine.
  state = jax.block_until_ready(tx.init(params))
  for _ in range(6):
    params, state, _ = jax.block_until_ready(jitted(params, state, x, labels))
  return params


stage("single device")
single = jax.device_put(train(params, x, labels, jax.jit(step)), jax.devices()[0])
mesh = Mesh(np.array(jax.devices()), ("data",))
replicated = NamedSharding(mesh, P())
batch = NamedSharding(mesh, P("data"))

stage("data parallel")
data_parallel = train(jax.device_put(params, replicated), jax.device_put(x, batch),
                      jax.device_put(labels, batch), jax.jit(step))
by_output = jax.tree.map(
    lambda p: jax.device_put(p, NamedSharding(mesh, P(*([None] * (p.ndim - 1)), "data"))),
    params)
stage("params sharded")
param_sharded = train(by_output, jax.device_put(x, replicated),
                      jax.device_put(labels, replicated), jax.jit(step))


# pmap (Flax's ImageNet pattern): replicated state, a batch shard per device,
# gradients and (axis_name) statistics averaged across devices.
tx_pmap = sngd_jax.sngd(0.1, momentum=0.9, inverse_every=2, kl_clip=None,
                        layer_fisher={"layer0": "relu", "*": "linear"},
                        axis_name="data")


def pmap_step(params, state, x, labels):
  (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
      params, x, labels)
  grads = jax.lax.pmean(grads, "data")
  updates, state = tx_pmap.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state


stage("pmap")
stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 8), tree)
pmapped = jax.pmap(pmap_step, axis_name="data")
replicas = (stack(params), stack(tx_pmap.init(params)))
for _ in range(6):
  replicas = jax.block_until_ready(
      pmapped(*replicas, x.reshape(8, 8, -1), labels.reshape(8, 8)))
pmap_params = replicas[0]
pmap_spread = max(float(jnp.max(jnp.abs(leaf - leaf[0])))
                  for leaf in jax.tree.leaves(pmap_params))


# shard_map over the batch axis, state replicated. The params enter
# replicated, so JAX sums their gradient over the devices itself: the loss is
# averaged inside the differentiated function instead of pmeaning gradients.
def shard_map_step(params, state, x, labels):
  def mean_loss(params):
    loss, acts = loss_and_acts(params, x, labels)
    return jax.lax.pmean(loss, "data"), acts

  (_, acts), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
  updates, state = tx_pmap.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state


stage("shard_map")
shard_mapped = jax.jit(jax.shard_map(
    shard_map_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
    out_specs=(P(), P())))
shard_map_params, shard_map_state = params, tx_pmap.init(params)
for _ in range(6):
  shard_map_params, shard_map_state = jax.block_until_ready(shard_mapped(
      shard_map_params, shard_map_state, x, labels))


# An explicit-sharding mesh (jax.make_mesh's default axis type): an embedding
# (a scatter of sharded token ids) and dense layers, batch sharded.
explicit_mesh = jax.make_mesh((8,), ("data",),
                              axis_types=(jax.sharding.AxisType.Explicit,))
table = {"embed": {"embedding": jax.random.normal(jax.random.PRNGKey(2), (10, 16))},
         **params}
ids = jax.random.randint(jax.random.PRNGKey(3), (64, 5), 0, 10)


def embedded_loss(params, ids, labels):
  # One-hot product: user code under explicit sharding avoids the gather.
  e = (jax.nn.one_hot(ids, 10) @ params["embed"]["embedding"]).mean(1)
  loss, acts = loss_and_acts({k: v for k, v in params.items() if k != "embed"},
                             e, labels)
  return loss, {**acts, "embed": {"inputs": ids}}


def embedded_step(params, state, ids, labels):
  (loss, acts), grads = jax.value_and_grad(embedded_loss, has_aux=True)(
      params, ids, labels)
  updates, state = tx.update(grads, state, params, activations=acts)
  return optax.apply_updates(params, updates), state, loss


stage("explicit mesh")
explicit_single = train(table, ids, labels, jax.jit(embedded_step))
with jax.set_mesh(explicit_mesh):
  explicit = train(
      jax.device_put(table, NamedSharding(explicit_mesh, P())),
      jax.device_put(ids, NamedSharding(explicit_mesh, P("data"))),
      jax.device_put(labels, NamedSharding(explicit_mesh, P("data"))),
      jax.jit(embedded_step))


# The refresh divided among the devices: a Nystrom block, per-unit blocks and
# two exact blocks of one size (a group: 4 devices each on 8, whole blocks on
# 2), against one device.
# Every batched factorization here, the two models under vmap included, stays
# under jaxlib's 2e5-FLOP threshold for splitting a batch across its intra-op
# threads (jaxlib 0.10 ParallelBatchMap): those are the threads that run the 8
# simulated devices, so when all 8 wait on their split batches at once no
# thread is left to do the work. CI deadlocked so with 24 per-unit blocks of
# 25 rows (their inverses' triangular solves: 7.5e5 FLOPs under vmap); 24
# blocks of 13 rows cost 1.1e5.
WIDTHS = [40, 12, 24, 24, 8]
split_params = mlp_params(jax.random.PRNGKey(4), WIDTHS, jnp.float32)
split_x, split_labels = blobs(jax.random.PRNGKey(5), n=64, d=40, classes=8,
                              dtype=jnp.float32)
split_options = dict(inverse_every=2, kl_clip=None, layer_fisher={"layer1": "relu"},
                     nystrom=sngd_jax.Nystrom(rank=8, min_dim=32))


def split_train(tx, params, x, labels, run, mean_grads=False, mean_loss=False,
                init=None):
  def step(params, state, x, labels):
    def loss(params):
      logits, acts = mlp_forward(params, x)
      # A one-hot product: explicit sharding refuses a gather by sharded labels.
      value = -jnp.mean(jnp.sum(jax.nn.log_softmax(logits)
                                * jax.nn.one_hot(labels, 8), axis=-1))
      return (jax.lax.pmean(value, "data") if mean_loss else value), acts
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
    if mean_grads:
      grads = jax.lax.pmean(grads, "data")
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state
  return run(step, params, jax.block_until_ready((init or tx.init)(params)),
             x, labels)


def run_steps(step, params, state, x, labels):
  step = jax.jit(step)
  for _ in range(6):
    params, state = jax.block_until_ready(step(params, state, x, labels))
  return params, state


stage("divided refresh: one device")
split_single, _ = split_train(sngd_jax.sngd(0.1, momentum=0.9, **split_options),
                              split_params, split_x, split_labels, run_steps)
split_tx = sngd_jax.sngd(0.1, momentum=0.9, refresh_axis="data", **split_options)
split_results = {}
for name, devices in (("split_jit_8", 8), ("split_jit_2", 2)):
  mesh_n = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices],
                         axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh_n):
    on = lambda a, spec, mesh_n=mesh_n: jax.device_put(a, NamedSharding(mesh_n, spec))
    split_results[name], split_state = split_train(
        split_tx, on(split_params, P()), on(split_x, P("data")),
        on(split_labels, P("data")), run_steps)
with jax.set_mesh(explicit_mesh):
  on = lambda a, spec: jax.device_put(a, NamedSharding(explicit_mesh, spec))
  split_results["split_explicit"], _ = split_train(
      split_tx, on(split_params, P()), on(split_x, P("data")),
      on(split_labels, P("data")), run_steps)
split_tx_mapped = sngd_jax.sngd(0.1, momentum=0.9, refresh_axis="data",
                                axis_name="data", **split_options)


def run_pmap(step, params, state, x, labels):
  stepped = jax.pmap(step, axis_name="data")
  carry = (stack(params), stack(state))
  for _ in range(6):
    carry = jax.block_until_ready(stepped(*carry, x.reshape(8, 8, -1),
                                          labels.reshape(8, 8)))
  return jax.tree.map(lambda a: a[0], carry[0]), None


def run_shard_map(step, params, state, x, labels):
  stepped = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                  out_specs=(P(), P())))
  for _ in range(6):
    params, state = jax.block_until_ready(stepped(params, state, x, labels))
  return params, state


stage("divided refresh: pmap, shard_map")
split_results["split_pmap"], _ = split_train(
    split_tx_mapped, split_params, split_x, split_labels, run_pmap, mean_grads=True)
split_results["split_shard_map"], _ = split_train(
    split_tx_mapped, split_params, split_x, split_labels, run_shard_map,
    mean_loss=True)

# Two models under vmap (vmap_axis_name) with the refresh divided among the
# mesh's 8 devices: each model as if trained alone on one device.
second_params = mlp_params(jax.random.PRNGKey(9), WIDTHS, jnp.float32)
second_single, _ = split_train(sngd_jax.sngd(0.1, momentum=0.9, **split_options),
                               second_params, split_x, split_labels, run_steps)
vmap_tx = sngd_jax.sngd(0.1, momentum=0.9, refresh_axis="data",
                        vmap_axis_name="models", **split_options)


def run_vmapped(step, params, state, x, labels):
  return run_steps(jax.vmap(step, in_axes=(0, 0, None, None), axis_name="models"),
                   params, state, x, labels)


stage("divided refresh: vmap")
with jax.set_mesh(mesh):
  pair = jax.tree.map(lambda a, b: jnp.stack([a, b]), split_params, second_params)
  both, _ = split_train(vmap_tx, pair, split_x, split_labels, run_vmapped,
                        init=jax.vmap(vmap_tx.init))
split_vmap = max(rel(jax.tree.map(lambda a: a[0], both), split_single),
                 rel(jax.tree.map(lambda a: a[1], both), second_single))

# Every block kind divided on 8 devices against its whole refresh: an
# embedding used by attend, two norms of one width (a group), a softmax
# layer, per-unit blocks, three exact blocks of one size (2 devices each, 2
# idle) and a Nystrom block.
stage("every block kind")
kinds_layers, entries, _ = every_block_kind(units="tanh", norms=2, exact=3)
kinds_stats = {layer.path: layer.block.statistic(entries[layer.path], jnp.float32)
               for layer in kinds_layers}
kinds_whole = jax.jit(lambda s: flops.refresh({}, kinds_layers, s))(kinds_stats)
with jax.set_mesh(mesh):
  kinds_divided = jax.jit(lambda s: flops.refresh({}, kinds_layers, s, "data"))(
      kinds_stats)
kinds_gap = {path: rel(kinds_divided[path], kinds_whole[path])
             for path in kinds_whole}

# Low-rank output roots (above OUTPUT_EXACT_DIM outputs, lowered here to 24,
# rank 8): the devices divide each root's products by rows (41 rows: the
# last device's part is padding), against the whole.
stage("low-rank output roots")
exact_dim, rank = transform.OUTPUT_EXACT_DIM, transform.OUTPUT_RANK
transform.OUTPUT_EXACT_DIM, transform.OUTPUT_RANK = 24, 8
wide_means = jnp.stack([jnp.asarray(np.cov(np.random.default_rng(seed).normal(
    size=(41, 60)) * np.linspace(0.2, 3, 41)[:, None]), jnp.float32)
                        for seed in range(2)])
wide_whole = jax.jit(transform.output_factor_roots)(wide_means, 0.9)
with jax.set_mesh(mesh):
  wide_divided = jax.jit(lambda m, r: transform.output_factor_roots(
      m, r, "data"))(wide_means, 0.9)
transform.OUTPUT_EXACT_DIM, transform.OUTPUT_RANK = exact_dim, rank
low_rank_gap = rel(wide_divided, wide_whole)

# Per-device FLOPs of the divided refresh on 8 devices, against one device's:
# the autoencoder's layers with the defaults (exact 501/251/31 blocks, rank-32
# Nystrom blocks for 785 and 1001 rows).
stage("refresh FLOPs")
sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
ae = {f"l{i}": {"kernel": jnp.zeros((a, b)), "bias": jnp.zeros(b)}
      for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
ae_layers, _ = transform.plan_layers(ae, "linear", sngd_jax.Nystrom())
ae_stats = {layer.path: layer.block.init(jnp.float32) for layer in ae_layers}


def refresh_flops_ratio_of(options):
  one = jax.jit(lambda s: flops.refresh(options, ae_layers, s)).lower(
      ae_stats).compile()
  with jax.set_mesh(mesh):
    eight = jax.jit(lambda s: flops.refresh(options, ae_layers, s, "data")
                    ).lower(ae_stats).compile()
  return flops.program_flops(eight) / flops.program_flops(one)


# The input blocks alone, and with the output factors' roots (divided by
# factor: at most one root of each output size per device here).
refresh_flops_ratio = refresh_flops_ratio_of({"output_factor": False})
refresh_flops_ratio_all = refresh_flops_ratio_of({})

# refresh_axis="auto" (the default) under a one-axis mesh divides the
# refresh as refresh_axis="data" does: the compiled update's factorizations
# per device, against refresh_axis=None's.
stage("refresh_axis auto")
(_, auto_acts), auto_grads = jax.value_and_grad(loss_and_acts, has_aux=True)(
    params, x, labels)


def update_factorization_flops(**options):
  wide_tx = sngd_jax.sngd(0.1, nystrom=None, **options)
  with jax.set_mesh(mesh):
    compiled = jax.jit(lambda g, s, p, a: wide_tx.update(
        g, s, p, activations=a)).lower(auto_grads, wide_tx.init(params),
                                       params, auto_acts).compile()
  return flops.custom_call_flops(compiled.as_text())


whole_flops = update_factorization_flops(refresh_axis=None)
auto_flops_ratio = update_factorization_flops() / whole_flops
named_flops_ratio = update_factorization_flops(refresh_axis="data") / whole_flops


stage("done")
kernel = param_sharded["layer0"]["kernel"]
print(json.dumps({
    "data_parallel": rel(data_parallel, single),
    "param_sharded": rel(param_sharded, single),
    "pmap": rel(jax.tree.map(lambda a: a[0], pmap_params), single),
    "shard_map": rel(shard_map_params, single),
    "explicit_mesh": rel(explicit, explicit_single),
    **{name: rel(result, split_single) for name, result in split_results.items()},
    "split_vmap": split_vmap,
    "split_faults": int(split_state[0].inverse_faults),
    "refresh_flops_ratio": refresh_flops_ratio,
    "refresh_flops_ratio_all": refresh_flops_ratio_all,
    "auto_flops_ratio": auto_flops_ratio,
    "named_flops_ratio": named_flops_ratio,
    "kinds_gap": kinds_gap,
    "low_rank_gap": low_rank_gap,
    "pmap_spread": pmap_spread,
    "kernel_sharding": list(kernel.sharding.spec),
    "batch_devices": len(data_parallel["layer0"]["kernel"].sharding.device_set),
}))
