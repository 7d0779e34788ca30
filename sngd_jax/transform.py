"""The SNGD Optax transform: ``scale_by_sngd`` and the ``sngd`` alias."""

import dataclasses
import fnmatch
import math
import numbers
import sys
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sngd_jax import fisher, linalg, split

# A per-layer option: one value, a mapping from glob patterns of layer paths to
# values, or a callable from the path to a value.
PerLayer = str | Mapping[str, str] | Callable[[str], str]
# How many trailing kernel axes are outputs, per layer (None: inferred).
OutputAxes = None | int | Mapping[str, int] | Callable[[str], int | None]
# Whether a layer's params lead with a layer axis, per layer (None: inferred).
Stacked = None | bool | Mapping[str, bool] | Callable[[str], bool | None]
WEIGHT_SHARING = ("auto", "reduce", "expand")
# stats_positions="auto": positions per example a statistic samples, by how
# the layer's uses share the loss. Under "reduce" they are one example's
# (correlated: an image's patches), so a few estimate their sum; under
# "expand" each use is an example (tokens, time steps) and keeps more.
AUTO_STATS_POSITIONS = {"reduce": 16, "expand": 64}
# The output factor R (output_factor=True): directions are multiplied by
# R^-OUTPUT_POWER, R's eigenvalues (mean 1) clipped to OUTPUT_RANGE; layers
# with more outputs than OUTPUT_MAX_DIM go without (R is d_out x d_out).
# Above OUTPUT_EXACT_DIM outputs R keeps its OUTPUT_RANK largest eigenpairs
# and the rest's mean (``linalg.output_roots``): on 2 CPU cores the roots of
# 2048 outputs took 1.26 s by eigh, 0.18 s so.
OUTPUT_POWER = 0.5
OUTPUT_RANGE = (1 / 16, 16.0)
OUTPUT_MAX_DIM = 2048
OUTPUT_EXACT_DIM = 1024
OUTPUT_RANK = 256


@dataclasses.dataclass(frozen=True)
class Nystrom:
  """Low-rank ``linear`` blocks for wide layers.

  Attributes:
    rank: columns sampled per block (the bias column is always one of them).
    min_dim: blocks with more rows than this (``d_in + 1``) use Nystrom.
  """

  rank: int = 32
  min_dim: int = 512

  def __post_init__(self):
    for name in ("rank", "min_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"Nystrom.{name} must be an int >= 2, got {value!r}")


class ScaleBySNGDState(NamedTuple):
  """State of :func:`scale_by_sngd`.

  The per-layer dicts are keyed by stack (``Stack.key``: a layer's path
  ``"a/b/0"``, or the paths of alike layers kept as one array, ``"a, b"``);
  :func:`layer_slice` reads one layer's part.
  """

  count: jax.Array  # type: ignore[assignment]  # int32 (): steps taken.
  stats_weight: jax.Array  # float (): 1 - ema_decay^k after k statistics updates.
  stats: dict[str, Any]  # Zero-started EMA local Fisher per stack: (rows, ...) or one layer's shapes in ``sngd_jax.fisher``.
  preconditioners: dict[str, Any]  # Damped inverses per stack, refreshed every ``inverse_every``.
  stats_faults: jax.Array  # int32 (): batches whose statistic was not finite (skipped).
  inverse_faults: jax.Array  # int32 (): refreshes that failed (last good kept; retried if uncapped).
  clipped: jax.Array  # int32 (): steps whose direction ``kl_clip`` shortened.
  momentum: Any  # params-shaped heavy-ball buffer ``m``; None without ``momentum``.
  momentum_norm: jax.Array  # float32 (): ``|m|_G^2``, the buffer's squared length in the blocks' metric.
  output_stats: dict[str, Any]  # ([rows,] d_out, d_out) zero-started EMA of v^T g (symmetrized when refreshed) per stack with an output factor.
  # (R^-p, R^{p/2}), each ([rows,] d_out, d_out), refreshed with the inverses. R^{p/2}
  # is kept, not derived in the momentum remeasure: a factorization there
  # deadlocked jaxlib 0.10's threaded batched LAPACK on CPU under vmap.
  output_factors: dict[str, Any]


# ----------------------------------------------------------------------------
# Paths.


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_tuple(path) -> tuple[str, ...]:
  """A jax.tree_util key path as strings, without nnx's trailing ``.value``."""
  names = tuple(_key_name(k) for k in path)
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names = names[:-1]
  return names


def path_str(names: tuple[str, ...]) -> str:
  return "/".join(names)


# ----------------------------------------------------------------------------
# The layer plan: which parameters form which local Fisher block.


@dataclasses.dataclass(frozen=True)
class Layer:
  """One preconditioned module.

  ``leaves`` lists its parameters in the order they stack into the gradient
  matrix ``g (n, d_out)``: ``(leaf index, parameter name, rows)``. A stack
  (``stack`` layers whose params lead with a layer axis, run by a scan over
  the model's blocks) has a block per layer: its statistics, preconditioners
  and ``g`` lead with that axis, ``(stack, n, d_out)``.
  """

  path: str
  kind: str
  block: Any
  leaves: tuple[tuple[int, str, int], ...]
  d_in: int
  d_out: int
  kernel_shape: tuple[int, ...] = ()  # one layer's
  output_axes: int = 1
  stack: int = 0  # layers on the leading axis; 0: a single layer

  @property
  def lead(self) -> tuple[int, ...]:
    """The leading shape of the layer's arrays: ``(stack,)`` or ``()``."""
    return (self.stack,) if self.stack else ()


def _mapped(function, over_rows: bool, factors: bool = False, shared=()):
  """``function(*rows, *shared)`` mapped over the leading axis of each of the
  arguments it is called with (the rows of a stack; ``shared`` go whole to
  every row), or called once.

  One batched program (``jax.vmap``); where ``function`` factors a matrix
  (a refresh, a root, a metric), in batches small enough for XLA:CPU
  (``fisher.batched``: larger batched factorizations hung the step). Traced
  values ``function`` needs go in ``shared``, not in its closure (a batching
  rule under an outer ``vmap`` sees only its arguments).
  """
  if factors and not over_rows:
    return lambda *rows: fisher.factored(function, *rows, *shared)
  if not over_rows:
    return lambda *rows: function(*rows, *shared)
  if factors:
    return lambda *rows: fisher.batched(function, rows, *shared)
  return lambda *rows: jax.vmap(
      function, in_axes=(0,) * len(rows) + (None,) * len(shared))(
          *rows, *shared)


def _consecutive_rows(tree, sizes: list[int]) -> list:
  """``tree``'s leading axis cut into consecutive parts of ``sizes`` rows."""
  parts, offset = [], 0
  for size in sizes:
    parts.append(jax.tree.map(lambda x, o=offset, r=size: x[o:o + r], tree))
    offset += size
  return parts


@dataclasses.dataclass(frozen=True)
class _Rows:
  """Layers laid out as rows of one array: each one's (a scanned stack's
  several), on a leading axis; a single layer's alone keeps its layout."""

  layers: tuple[Layer, ...]

  @property
  def lead(self) -> tuple[int, ...]:
    """The leading shape of the arrays: the rows, or ``()``."""
    if len(self.layers) == 1:
      return self.layers[0].lead
    return (sum(max(layer.stack, 1) for layer in self.layers),)

  def each(self, function, *shared, factors: bool = False):
    """``function`` applied to each row (``_mapped``)."""
    return _mapped(function, bool(self.lead), factors, shared)

  def split(self, tree) -> list:
    """Each layer's part of the rows, in the layer's own layout."""
    if len(self.layers) == 1:
      return [tree]
    parts = _consecutive_rows(tree, [max(layer.stack, 1)
                                     for layer in self.layers])
    return [part if layer.stack else jax.tree.map(lambda x: x[0], part)
            for layer, part in zip(self.layers, parts)]

  def join(self, parts: list):
    """``split``'s inverse: the layers' parts as rows."""
    if len(self.layers) == 1:
      return parts[0]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *[
        part if layer.stack else jax.tree.map(lambda x: x[None], part)
        for layer, part in zip(self.layers, parts)])


@dataclasses.dataclass(frozen=True)
class Stack(_Rows):
  """Alike layers whose blocks are kept, refreshed and applied as one array.

  Layers with the same block (kind and size), outputs and state dtype: a
  transformer's q/k/v/out projections and MLP inputs of one width, the convs
  of a ResNet stage, and the layers of a scanned stack. Every stage after the
  statistics runs once per stack, batched over its rows (one per layer); each
  layer takes its statistic from its own activations. The state's arrays of a
  stack lead with its rows, except a single layer's (its own layout).
  Embedding tables are never stacked (their step reads their activations).
  """

  @property
  def key(self) -> str:
    """The state's key: the layers' paths (a scanned one's with its layers)."""
    if len(self.layers) == 1:
      return self.layers[0].path
    return ", ".join(f"{layer.path}[{layer.stack}]" if layer.stack
                     else layer.path for layer in self.layers)

  @property
  def name(self) -> str:
    """A short name for ``jax.named_scope``."""
    extra = len(self.layers) - 1
    return self.layers[0].path + (f"+{extra}" if extra else "")

  @property
  def block(self):
    return self.layers[0].block

  def batch(self, tree):
    """The stack's arrays with a leading rows axis (a single layer's: one)."""
    return tree if self.lead else jax.tree.map(lambda x: x[None], tree)

  def unbatch(self, tree):
    """``batch``'s inverse."""
    return tree if self.lead else jax.tree.map(lambda x: x[0], tree)

  def entry(self, entries: Mapping) -> Mapping:
    """What a block's step reads of the activations: an embedding's entry
    (its lookups); no other block reads them."""
    return (entries[self.layers[0].path]
            if isinstance(self.block, fisher.Embedding) else {})

  def rows_of(self, values: Mapping[str, Any]):
    """One value per layer, laid out on the stack's rows (``()`` for a
    single layer)."""
    if not self.lead:
      return jnp.asarray(values[self.layers[0].path], jnp.float32)
    return jnp.concatenate([
        jnp.full((max(layer.stack, 1),), values[layer.path], jnp.float32)
        for layer in self.layers])


def layer_slice(blocks: Mapping[str, Any], path: str):
  """One layer's part of a per-stack dict of the state (``stats``,
  ``preconditioners``, ``output_stats``, ``output_factors``), in the layer's
  own layout (a scanned stack's leads with its layers).

  Example:
    >>> import jax.numpy as jnp, sngd_jax
    >>> dense = lambda: {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> state = sngd_jax.scale_by_sngd().init({"a": dense(), "b": dense()})
    >>> list(state.stats)
    ['a, b']
    >>> sngd_jax.layer_slice(state.stats, "b").shape
    (4, 4)
  """
  for key, value in blocks.items():
    if key == path:
      return value
    offset = 0
    for member in key.split(", "):
      name, _, rows = member.partition("[")
      size = int(rows[:-1]) if rows else 1
      if name == path:
        part = jax.tree.map(
            lambda x, o=offset, r=size: x[o:o + r], value)
        return part if rows else jax.tree.map(lambda x: x[0], part)
      offset += size
  raise KeyError(f"no layer {path!r} in the state's blocks: {list(blocks)}")


def _statistics_batches(stack: Stack, entries, sharing):
  """``(mode, layers)``: a stack's layers with activations, in batches whose
  entries have one structure and shapes (so they stack) and one weight
  sharing mode (``sharing(path, one layer's entry)``)."""
  batches: dict[tuple, list[Layer]] = {}
  for layer in stack.layers:
    if layer.path not in entries:
      continue
    entry = _one_layer(layer, entries[layer.path])
    mode = sharing(layer.path, entry)
    shapes = tuple((np.shape(x), str(jnp.result_type(x)))
                   for x in jax.tree.leaves(entry))
    batches.setdefault((mode, jax.tree.structure(entry), shapes),
                       []).append(layer)
  return [(key[0], tuple(layers)) for key, layers in batches.items()]


def plan_stacks(layers, dtype_of: Callable[[Layer], Any]) -> list[Stack]:
  """The layers grouped into stacks, in the order they first appear.

  Alike: the same block (kind and size: ``fisher``'s dataclasses compare by
  value), outputs and state dtype (``dtype_of(layer)``).
  """
  groups: dict[tuple, list[Layer]] = {}
  for layer in layers:
    dtype = dtype_of(layer)
    alike = ((layer.path,) if layer.kind == "embedding"
             else (layer.block, layer.kind, layer.d_out, dtype))
    groups.setdefault(alike, []).append(layer)
  return [Stack(tuple(group)) for group in groups.values()]


def _resolve(option, path: str, default):
  """A per-layer option's value: one value, glob patterns of paths, or a callable."""
  if isinstance(option, (str, int)):
    return option
  if isinstance(option, Mapping):
    for pattern, value in option.items():
      if fnmatch.fnmatchcase(path, pattern):
        return value
    return default
  return option(path)


def _stacked_by_bias(kernel_shape, bias_shape) -> bool | None:
  """Whether a kernel leads with a layer axis, as its bias shows; None: no bias.

  A stack's bias ``(layers, *outputs)`` leads with the kernel's layer axis and
  ends with its output axes; a single layer's bias is the output axes alone.
  """
  if bias_shape is None:
    return None
  kernel_shape, bias_shape = tuple(kernel_shape), tuple(bias_shape)
  if bias_shape and kernel_shape[-len(bias_shape):] == bias_shape:
    return False
  return (len(bias_shape) >= 2 and len(kernel_shape) >= 3
          and bias_shape[0] == kernel_shape[0]
          and kernel_shape[len(kernel_shape) - len(bias_shape) + 1:]
          == bias_shape[1:])


def _kernel_output_axes(path, kernel_shape, bias_shape, output_axes):
  """How many trailing axes of one layer's kernel are outputs.

  ``output_axes`` decides where it names the layer; else the bias does (its
  shape is the output axes': attention's q/k/v ``(heads, head_dim)``); else
  one (dense, conv, an output projection ``(heads, head_dim, d_model)``).
  """
  chosen = None if output_axes is None else _resolve(output_axes, path, None)
  if chosen is not None:
    if not isinstance(chosen, int) or not 1 <= chosen < len(kernel_shape):
      raise ValueError(f"output_axes for {path!r} is {chosen!r}; its kernel "
                       f"{kernel_shape} takes 1..{len(kernel_shape) - 1}")
    outputs = chosen
  elif bias_shape and tuple(kernel_shape[-len(bias_shape):]) == tuple(bias_shape):
    outputs = min(len(bias_shape), len(kernel_shape) - 1)
  else:
    outputs = 1
  if bias_shape is not None:
    d_out = math.prod(kernel_shape[len(kernel_shape) - outputs:])
    if math.prod(bias_shape) != d_out:
      raise ValueError(f"{path}/bias has shape {bias_shape}; the kernel "
                       f"{kernel_shape} has {d_out} outputs")
  return outputs


def _dense_block(kind, path, n, d_out, bias, nystrom):
  if kind == "linear":
    if nystrom is not None and n > nystrom.min_dim and nystrom.rank < n:
      return fisher.NystromLinear.for_width(n, nystrom.rank, bias)
    return fisher.Linear(n)
  if kind == "softmax":
    return fisher.Softmax(n, d_out)
  return fisher.PerUnit(n, d_out, fisher.NU[kind])


def plan_layers(tree, layer_fisher, nystrom, output_axes=None, stacked=None):
  """Groups the leaves of ``tree`` (params or gradients) into layers.

  A module is the parent of a ``kernel`` (dense, convolution, attention
  projection: its leading axes are inputs and its trailing axes outputs, read
  as ``(d_in, d_out)``; see ``_kernel_output_axes``), of an ``embedding``
  table, or of ``scale``/``bias`` without a kernel (normalization layers).
  A module whose params lead with a layer axis (a model that scans over its
  blocks) is a stack of such layers: ``stacked`` says so per layer; where it
  is None, a kernel's bias shows it (``_stacked_by_bias``), and a module
  without that evidence (a bias-free kernel, a norm) is stacked where a
  module beside it, under the same parent, was found stacked with as many
  layers.

  Returns:
    ``(layers, passthrough)``: the layers (none where ``layer_fisher`` maps a
    module to ``"none"``, or another transform owns it under
    ``optax.masked``/``multi_transform``); the paths of the leaves that belong
    to none and pass through unchanged.
  """
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  modules: dict[tuple[str, ...], dict[str, tuple[int, Any]]] = {}
  for index, (path, leaf) in enumerate(leaves_with_path):
    names = path_tuple(path)
    if names[-1:] in (("lora_a",), ("lora_b",)):  # nnx.LoRA: two dense layers
      modules[names] = {"kernel": (index, leaf)}
      continue
    modules.setdefault(names[:-1], {})[names[-1] if names else ""] = (index, leaf)
  # Under optax.masked / multi_transform what another transform owns is a
  # MaskedNode: a whole subtree (a module or more) or one leaf of a module.
  masked = [path_tuple(path) for path, leaf in
            jax.tree_util.tree_flatten_with_path(
                tree, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]
            if isinstance(leaf, optax.MaskedNode)]
  stacks = _stack_evidence(modules, stacked)

  def stack_of(module_path, children) -> int:
    """How many layers a module's params stack (0: one layer)."""
    names = [name for name in ("kernel", "embedding", "scale", "bias")
             if name in children]
    if not names:
      return 0
    shape = np.shape(children[names[0]][1])
    choice = _stack_choice(module_path, children, stacked)
    if choice is None:
      choice = any(module_path[:depth] + shape[:1] in stacks
                   for depth in range(1, len(module_path)))
    least = 3 if "kernel" in children or "embedding" in children else 2
    return shape[0] if choice and len(shape) >= least else 0

  layers, claimed = [], set()
  for module_path, children in modules.items():
    if any(module_path[:len(m)] == m or module_path == m[:-1] for m in masked):
      continue  # partly masked: its other leaves get the plain gradient
    layer = _module_layer(path_str(module_path), children, layer_fisher,
                          nystrom, output_axes, stack_of(module_path, children))
    if layer is not None:
      layers.append(layer)
      claimed.update(index for index, _, _ in layer.leaves)
  passthrough = [path_str(path_tuple(p)) for i, (p, _) in
                 enumerate(leaves_with_path) if i not in claimed]
  return layers, passthrough


def _stack_choice(module_path, children, stacked) -> bool | None:
  """Whether a module is a stack, as ``stacked`` or its kernel's bias says;
  None where neither does."""
  choice = None if stacked is None else _resolve(
      stacked, path_str(module_path), None)
  if choice is None and "kernel" in children and "bias" in children:
    choice = _stacked_by_bias(np.shape(children["kernel"][1]),
                              np.shape(children["bias"][1]))
  return choice


def _stack_evidence(modules, stacked) -> set[tuple]:
  """``(*ancestor path, layers)`` for every ancestor of a kernel that is a
  stack by ``_stack_choice``: the ancestor's other modules with as many
  layers on their leading axis are stacks too."""
  evidence: set[tuple] = set()
  for module_path, children in modules.items():
    kernel = np.shape(children["kernel"][1]) if "kernel" in children else ()
    if len(kernel) >= 3 and _stack_choice(module_path, children, stacked):
      evidence.update(module_path[:depth] + kernel[:1]
                      for depth in range(1, len(module_path)))
  return evidence


def _module_layer(path, children, layer_fisher, nystrom, output_axes, stack):
  """The layer of one module (None if it has none); ``stack``: how many
  layers its params stack on their leading axis (0: one layer)."""
  lead = 1 if stack else 0

  def shape(name):
    return np.shape(children[name][1])[lead:]

  def leaf(name, rows):
    return (children[name][0], name, rows)

  if "kernel" in children:
    kernel_shape = shape("kernel")
    if len(kernel_shape) < 2:
      return None
    kind = _resolve(layer_fisher, path, "linear")
    if kind not in fisher.KINDS:
      raise ValueError(f"layer_fisher for {path!r} is {kind!r}; expected one "
                       f"of {fisher.KINDS}")
    if kind == "none":
      return None
    bias = shape("bias") if "bias" in children else None
    outputs = _kernel_output_axes(path, kernel_shape, bias, output_axes)
    d_out = math.prod(kernel_shape[len(kernel_shape) - outputs:])
    d_in = math.prod(kernel_shape[:len(kernel_shape) - outputs])
    leaves = [leaf("kernel", d_in)]
    if bias is not None:
      leaves.append(leaf("bias", 1))
    n = len(leaves) - 1 + d_in
    block = _dense_block(kind, path, n, d_out, bias is not None, nystrom)
    return Layer(path, kind, block, tuple(leaves), d_in, d_out,
                 tuple(kernel_shape), outputs, stack)

  if not isinstance(layer_fisher, str) and _resolve(layer_fisher, path, "linear") == "none":
    return None
  if "embedding" in children and len(shape("embedding")) >= 2:
    table = shape("embedding")
    return Layer(path, "embedding",
                 fisher.Embedding(table[0], math.prod(table[1:])),
                 (leaf("embedding", table[0]),), 1, math.prod(table[1:]),
                 stack=stack)
  if "scale" in children or "bias" in children:
    names = [name for name in ("scale", "bias") if name in children]
    channels = {math.prod(shape(name)) for name in names}
    if len(channels) != 1:
      raise ValueError(f"{path}: scale and bias have different sizes")
    d_out = channels.pop()
    return Layer(path, "affine",
                 fisher.Affine(len(names), d_out, "scale" in children),
                 tuple(leaf(name, 1) for name in names), 1, d_out, stack=stack)
  return None


# ----------------------------------------------------------------------------
# Activations.


def _is_entry(x) -> bool:
  return isinstance(x, Mapping) and ("inputs" in x or "attend" in x)


_ENTRY_KEYS = ("inputs", "outputs", "attend", fisher.SLOPES, fisher.WEIGHTS,
               *fisher.MARKERS)


def flatten_activations(activations, prefix=()) -> dict[str, Mapping]:
  """``{layer path: {"inputs": x, "outputs": h}}`` from a nested activations
  tree. An entry's other keys are the layers inside that layer (a
  ``LoRALinear``'s ``lora``)."""
  flat: dict[str, Mapping] = {}
  for path, entry in jax.tree_util.tree_flatten_with_path(
      activations, is_leaf=_is_entry)[0]:
    names = prefix + path_tuple(path)
    if not _is_entry(entry):
      raise ValueError(
          f"activations at {path_str(names)!r} must be a dict with 'inputs' "
          f"(and 'outputs'; an embedding's 'attend'), got "
          f"{type(entry).__name__}")
    flat[path_str(names)] = {k: v for k, v in entry.items() if k in _ENTRY_KEYS}
    inner = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
    if inner:
      flat.update(flatten_activations(inner, names))
  return flat


def _check_entries_have_params(entries: Mapping[str, Mapping],
                               held: list[str]):
  """Raises a ValueError naming the hand-built entries at paths where the
  params hold nothing (``held``: the paths of their leaves and masked
  leaves), not even a masked or opted-out layer: a misspelt path, whose
  layer would otherwise go plain. A capture's entries there are frozen
  layers' (marked ``fisher.CAPTURED``) and go unused."""
  stray = sorted(path for path, entry in entries.items()
                 if fisher.CAPTURED not in entry and not any(
                     not path or leaf == path or leaf.startswith(path + "/")
                     for leaf in held))
  if stray:
    example = f" ({held[0]!r} is a parameter)" if held else ""
    raise ValueError(
        f"activations has entries at {stray} where the params have no "
        f"layer: a misspelt path? An entry's path is its layer's in the "
        f"params{example}. Drop the entries of layers this optimizer does "
        f"not train, or build them with sngd_jax.nnx_capture / "
        f"linen_capture, whose entries of frozen layers are ignored.")


def _check_stack(layer: Layer, entry: Mapping):
  """Raises a ValueError naming the layer's path where its params and its
  entry disagree on being a stack (a scan over the model's blocks)."""
  where = f"activations[{layer.path!r}]"
  if fisher.STACKED in entry and not layer.stack:
    raise ValueError(
        f"{where} was captured from a scan over stacked layers (its arrays "
        f"lead with the layer axis: {np.shape(_recorded(entry))}), but the "
        f"params of {layer.path!r} were not read as a stack (no bias shows "
        f"the layer axis): pass stacked={{{layer.path!r}: True}} (or a glob "
        "pattern of the stacked modules)")
  if layer.stack and fisher.STACKED not in entry:
    raise ValueError(
        f"the params of {layer.path!r} were read as a stack of {layer.stack} "
        f"layers (a leading layer axis), but {where} is one layer's (not "
        "captured inside a scan over them): pass stacked={"
        f"{layer.path!r}: False}} if its leading axis is not a layer axis")
  if layer.stack and np.shape(_recorded(entry))[:1] != (layer.stack,):
    raise ValueError(
        f"{where} has shape {np.shape(_recorded(entry))}; the stack's params "
        f"lead with {layer.stack} layers")


def _recorded(entry: Mapping):
  """The entry's main record: a layer's inputs, an embedding's ``attend``."""
  return entry.get("inputs", entry.get("attend"))


def _check_row_weights(where: str, entry: Mapping):
  """A ValueError unless the entry's weights per row (``SLOPES``,
  ``WEIGHTS``: ``(..., 1)``) have its records' positions."""
  for key in (fisher.SLOPES, fisher.WEIGHTS):
    if key not in entry:
      continue
    for name in ("inputs", "attend"):
      if name not in entry:
        continue
      shape = np.shape(entry[name])
      if name == "attend" or jnp.issubdtype(jnp.result_type(entry[name]),
                                            jnp.floating):
        shape = shape[:-1]  # not token ids: the features go
      if np.shape(entry[key]) != shape + (1,):
        raise ValueError(f"{where}[{key!r}] has shape "
                         f"{np.shape(entry[key])}; expected {shape + (1,)} "
                         f"(one weight per position of its {name!r})")


def _check_entry(layer: Layer, entry: Mapping):
  """Raises a ValueError naming the layer's path if its activations do not fit."""
  _check_stack(layer, entry)
  entry = _one_layer(layer, entry)
  where = f"activations[{layer.path!r}]"
  _check_row_weights(where, entry)
  if layer.kind == "embedding":
    if "inputs" in entry and not jnp.issubdtype(
        jnp.result_type(entry["inputs"]), jnp.integer):
      raise ValueError(f"{where}['inputs'] must hold integer token ids, got "
                       f"{jnp.result_type(entry['inputs'])}")
    if "attend" in entry and np.shape(entry["attend"])[-1:] != (layer.d_out,):
      raise ValueError(f"{where}['attend'] has shape "
                       f"{np.shape(entry['attend'])}; the table needs "
                       f"(..., {layer.d_out})")
    return
  if "inputs" not in entry:
    raise ValueError(f"{where} needs 'inputs'")
  x = entry["inputs"]
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{where}['inputs'] must be floating point, got "
                     f"{jnp.result_type(x)}")
  expected = layer.d_out if layer.kind == "affine" else layer.d_in
  if np.ndim(x) < 1 or np.shape(x)[-1] != expected:
    hint = ""
    if layer.kind != "affine" and layer.kernel_shape[:-1]:
      hint = (f" (its kernel {layer.kernel_shape} is read with "
              f"{layer.output_axes} output axes: the bias's, else one; "
              "output_axes={path pattern: k} sets another split)")
    raise ValueError(f"{where}['inputs'] has shape {np.shape(x)}; the layer's "
                     f"parameters need (..., {expected}){hint}")
  if layer.kind in fisher.NU or layer.kind == "softmax":
    if "outputs" not in entry:
      raise ValueError(f"{where} needs 'outputs' (pre-activations) for "
                       f"layer_fisher {layer.kind!r}")
    h = entry["outputs"]
    if np.shape(h)[:-1] != np.shape(x)[:-1] or np.shape(h)[-1] != layer.d_out:
      raise ValueError(f"{where}['outputs'] has shape {np.shape(h)}; expected "
                       f"{np.shape(x)[:-1] + (layer.d_out,)}")
    if not jnp.issubdtype(jnp.result_type(h), jnp.floating):
      raise ValueError(f"{where}['outputs'] must be floating point")


# ----------------------------------------------------------------------------
# Options.


def _is_number(x) -> bool:
  return isinstance(x, numbers.Number) and not isinstance(x, bool)


def _validate_per_layer(name, option, values):
  if isinstance(option, str) and option not in values:
    raise ValueError(f"{name} must be one of {values}, a mapping or a "
                     f"callable, got {option!r}")
  if isinstance(option, Mapping):
    for pattern, value in option.items():
      if value not in values:
        raise ValueError(f"{name}[{pattern!r}] is {value!r}; expected one of "
                         f"{values}")


_LIBRARIES = ("sngd_jax", "optax", "jax", "flax", "chex")


def _check_mapped_axes(count, axis_name, vmap_axis_name, refresh_axis):
  """Fails at trace time where the step is mapped and SNGD was not told.

  Under ``jax.vmap`` over several models' states without ``vmap_axis_name``
  the refresh conds become selects of every branch (a width-128 model's step
  hung on CPU); under ``pmap``/``shard_map`` without ``axis_name`` every
  device keeps the statistics of its own shard and the replicas drift apart.
  """
  if vmap_axis_name is None and type(count).__name__ == "BatchTracer":
    raise ValueError(
        "scale_by_sngd's state is batched by jax.vmap (several models at "
        "once): name the vmap's axis, jax.vmap(step, axis_name='models'), and "
        "pass sngd(..., vmap_axis_name='models') so that the models decide "
        "their statistics and refresh steps together")
  if axis_name is not None:
    return
  # jax exposes the axes bound around a trace only in its core (jax 0.10).
  axis_env = getattr(getattr(jax._src.core, "get_axis_env", lambda: None)(),
                     "axis_sizes", {})
  mapped = sorted(set(axis_env) - {vmap_axis_name, refresh_axis})
  if mapped:
    shown = ["(pmap's unnamed axis)" if name == "_internal_pmap_axis_name"
             else repr(name) for name in mapped]
    raise ValueError(
        f"scale_by_sngd runs inside jax.pmap / shard_map over {', '.join(shown)}"
        " without axis_name: each device would keep the statistics of its own "
        "shard and the replicas drift apart. Name the axis the gradients are "
        "averaged over, jax.pmap(step, axis_name='data'), and pass "
        "sngd(..., axis_name='data')")


# Callers known to call ``tx.update`` without extra arguments, and the fix.
_DROPPING_CALLERS = {
    "flax/training/train_state.py": (
        "Flax's TrainState.apply_gradients calls tx.update without them: use "
        "sngd_jax.TrainState, whose apply_gradients(grads=..., "
        "activations=acts) passes them on."),
    "flax/nnx/training/optimizer.py": (
        "Pass them to the optimizer: optimizer.update(model, grads, "
        "activations=acts)."),
}


def _missing_activations_hint() -> str:
  """What to do, naming the caller that dropped the activations if known."""
  frame: types.FrameType | None = sys._getframe(1)
  while frame is not None:
    filename = frame.f_code.co_filename.replace("\\", "/")
    for suffix, hint in _DROPPING_CALLERS.items():
      if filename.endswith(suffix):
        return hint
    frame = frame.f_back
  return ("Call tx.update(grads, state, params, activations=acts); a wrapper "
          "or training loop that calls update for you must pass them on.")


def _user_stacklevel() -> int:
  """The ``stacklevel`` of the first caller outside sngd_jax, Optax, JAX and Flax.

  A warning raised while ``tx.update`` is traced (inside ``jit``, an Optax
  chain, ``nnx.Optimizer``) then points at the user's line.
  """
  frame: types.FrameType | None = sys._getframe(1)
  level = 1
  while frame is not None and str(frame.f_globals.get("__name__", "")).split(
      ".")[0] in _LIBRARIES:
    frame, level = frame.f_back, level + 1
  return level


def _warn_unmatched(params, **options):
  """Warns about glob patterns of per-layer options that name no module."""
  modules = {path_str(path_tuple(path)[:-1]) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]}
  for name, option in options.items():
    if not isinstance(option, Mapping):
      continue
    for pattern in option:
      if not any(fnmatch.fnmatchcase(module, pattern) for module in modules):
        warnings.warn(f"sngd: {name} pattern {pattern!r} matches no layer; "
                      f"layers: {sorted(modules)}",
                      stacklevel=_user_stacklevel())


def _validate(ema_decay, damping, relative_damping, max_condition,
              stats_every, inverse_every, layer_fisher, solver, nystrom):
  if _is_number(ema_decay) and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
  for name, value in (("damping", damping),
                      ("relative_damping", relative_damping)):
    if _is_number(value) and value < 0:
      raise ValueError(f"{name} must be >= 0, got {value}")
  if _is_number(damping) and _is_number(relative_damping) and (
      damping + relative_damping <= 0):
    raise ValueError("damping + relative_damping must be > 0: an undamped "
                     "local Fisher is singular for a batch smaller than its "
                     "dimension")
  if max_condition is not None and not isinstance(max_condition, jax.Array) and (
      not _is_number(max_condition) or not max_condition >= 1):
    raise ValueError(f"max_condition must be None or a number >= 1, got "
                     f"{max_condition!r}")
  for name, value in (("stats_every", stats_every),
                      ("inverse_every", inverse_every)):
    if isinstance(value, bool) or (
        _is_number(value) and (value < 1 or int(value) != value)):
      raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  for name, value in (("ema_decay", ema_decay), ("damping", damping),
                      ("relative_damping", relative_damping),
                      ("max_condition", max_condition)):
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and (
        jnp.finfo(dtype).bits < 32):
      raise ValueError(
          f"{name} arrived as {dtype} (optax.inject_hyperparams stores "
          "hyperparameters in the params' dtype; ema_decay 0.999 rounds to 1 "
          "in bfloat16): pass optax.inject_hyperparams(sngd_jax.sngd, "
          "hyperparam_dtype=jnp.float32)")
  if solver not in linalg.SOLVERS:
    raise ValueError(f"solver must be one of {linalg.SOLVERS}, got {solver!r}")
  _validate_per_layer("layer_fisher", layer_fisher, fisher.KINDS)
  if nystrom is not None and not isinstance(nystrom, Nystrom):
    raise ValueError(f"nystrom must be None or sngd_jax.Nystrom, got {nystrom!r}")


# ----------------------------------------------------------------------------
# The transform.


def _finite(x, axis=None) -> jax.Array:
  """Whether ``x`` is finite (over ``axis``, all by default).

  ``x * 0`` is 0 where ``x`` is finite and NaN elsewhere, so its sum is
  finite exactly when ``x`` is: one reduction kernel, where XLA:CPU splits
  an ``all(isfinite)`` into reduce-window kernels (64 of a 12-block GPT's
  update's 493 kernels; ``jnp.max(jnp.abs(x))`` missed a NaN there).
  """
  return jnp.isfinite(jnp.sum(x * 0, axis=axis))


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([_finite(x) for x in jax.tree.leaves(tree)]))


def _state_dtype(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _dtype_of(leaves: list) -> Callable[[Layer], Any]:
  """A layer's state dtype, from its first parameter in ``leaves``."""
  return lambda layer: _state_dtype(leaves[layer.leaves[0][0]].dtype)


def scale_by_sngd(
    ema_decay: float = 0.95,
    damping: float = 1e-4,
    relative_damping: float = 1e-2,
    max_condition: float | None = 1e3,
    stats_every: int = 10,
    inverse_every: int = 100,
    layer_fisher: PerLayer = "linear",
    solver: str = "cholesky",
    nystrom: Nystrom | None = Nystrom(),
    kl_clip: float | None = 0.3,
    learning_rate: optax.ScalarOrSchedule = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_sharing: PerLayer = "auto",
    output_axes: OutputAxes = None,
    stacked: Stacked = None,
    axis_name: str | None = None,
    vmap_axis_name: str | None = None,
    stats_positions: int | str | None = "auto",
    refresh_axis: str | None = "auto",
    output_factor: bool | int = True,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions gradients with the damped inverse local Fisher of each layer.

  Structured natural gradient descent (SNGD): the global Fisher is replaced by
  a local block per layer (and per output unit for the per-unit kinds),
  estimated from the layer's own inputs and pre-activations, averaged by an
  exponential moving average, damped and inverted every ``inverse_every``
  steps. Plain gradient descent on the result is gradient descent on the
  paper's reconstructed network ``w' = G^{1/2} w``. The output is a direction
  (no learning rate, no sign flip): chain it like ``optax.scale_by_adam``.

  ``update(updates, state, params, *, activations)`` needs ``activations``: a
  pytree whose entry at a module's path is ``{"inputs": x, "outputs": h}``
  with ``x (..., d_in)`` the module's input and ``h (..., d_out)`` its
  pre-activation output in this forward pass (leading axes are averaged
  over). ``sngd_jax.nnx_capture``/``linen_capture`` build it for Flax models.
  Parameters whose module has no entry pass through unchanged (a warning at
  trace time names them).

  The options, by what they decide (the Args below in this order): the
  step (``learning_rate``, ``momentum``, ``nesterov``, ``kl_clip``); the
  curvature (``ema_decay``, ``damping``, ``relative_damping``,
  ``max_condition``, ``stats_every``, ``inverse_every``, ``stats_positions``,
  ``solver``, ``nystrom``, ``output_factor``); the layers
  (``layer_fisher``, ``weight_sharing``, ``output_axes``, ``stacked``); the
  devices (``axis_name``, ``vmap_axis_name``, ``refresh_axis``). Most users
  set the step's only.

  Args:
    learning_rate: the learning rate the output will be scaled by (a float
      or a schedule of the step count), used by ``kl_clip`` only.
    momentum: heavy-ball momentum ``m <- momentum * m + v``, output instead
      of ``v`` (None: none, no buffer). The clip then bounds the step ``m``
      itself: ``|m|_G^2`` is tracked exactly for a fixed metric
      (``momentum^2 |m|^2 + 2 momentum m . g + v . g``, since ``G v = g``),
      measured anew in the new blocks' metric at each refresh, and the
      buffer is shortened where it exceeds the bound. Noisy directions
      then add up to ``1 / (1 - momentum^2)`` times one step's
      squared length, not ``1 / (1 - momentum)^2``, so the clip binds only
      where the steps agree.
    nesterov: Nesterov momentum (output ``momentum * m + v``; the KL clip
      bounds that step, and the buffer with it).
    kl_clip: the step is scaled so that ``learning_rate^2 |s|_G^2 <=
      kl_clip`` (KL clipping, Ba, Grosse & Martens 2017): ``s`` is the
      direction ``v`` (``|v|_G^2 = v . g``), or with ``momentum`` the
      heavy-ball buffer ``m`` that is the step. ``|.|_G`` is the length in
      the blocks' metric, summed over the layers; a recurrent cell's
      (``weight_sharing="auto"``'s ``expand``) counts each of its uses, the
      per-example Fisher's upper bound. A proxy of the step's KL, not a
      bound on it: against the exact Fisher a clipped step's ``2 KL`` was
      ``kl_clip`` times 0.6 (median) with ``linear`` blocks, 9 with a
      ``softmax`` head (docs/guide.md, Step-size control). ``None``: no
      clip.
    ema_decay: ``S <- ema_decay * S + (1 - ema_decay) * batch statistic`` at
      each statistics update. ``S`` starts at zero; after ``k`` updates of
      weight ``w = 1 - ema_decay^k``, the block refreshed is
      ``S + (1 - w) (trace(S/w)/dim) I`` (with ``S/w`` the bias-corrected
      mean): shrunk toward its mean eigenvalue while few batches are in it,
      whatever the inputs' scale.
    damping: absolute damping added to every block's diagonal.
    relative_damping: damping relative to the block's mean eigenvalue: the
      block applied is ``G + (damping + relative_damping * trace(G)/dim +
      lambda_max(G) / max_condition) I``.
    max_condition: caps each block's condition number near this: the
      shift gains ``lambda_max(G) / max_condition`` (the largest eigenvalue
      by 16 power iterations at each refresh; for per-unit, Kronecker and
      embedding blocks that of the layer's whole block). The mean-relative
      damping alone leaves a block whose spectrum spans many decades (a
      dense head on convolutional features) nearly undamped in its weakest
      directions, which then take the steps that made such a model's loss
      rise at a learning rate the rest of it trains fastest at. ``None``:
      no cap.
    stats_every: update the statistics every this many steps (every step,
      with a refresh every ``stats_every`` steps, while the EMA's weight is
      below 0.9).
    inverse_every: refresh the inverses every this many steps (on step 0 too).
    stats_positions: a layer used at more positions per example than this
      (conv positions, tokens, scan steps) takes its statistic from this many
      of them, drawn at random at each statistics step (the same for every
      example): an unbiased estimate of the mean over all positions at
      ``stats_positions / P`` of the cost (a convolution's im2col patches are
      built at those positions only). ``None``: every position. ``"auto"``
      (default): 16 where the layer's ``weight_sharing`` is ``"reduce"`` (a
      convolution or norm over an image's positions: its patches are
      correlated, so a few estimate their sum; over every position a conv's
      statistic costs ``kh*kw*C_in / C_out`` times the convolution itself),
      64 where it is ``"expand"`` (tokens, time steps: each is an example);
      a string, so ``optax.inject_hyperparams`` leaves it static (an int
      needs ``static_args=("stats_positions",)`` there).
    solver: ``"cholesky"``, ``"eigh"`` or ``"denman_beavers"`` (the paper's
      reconstruction: ``G^{-1/2}`` by Denman-Beavers iteration, applied twice).
    nystrom: a :class:`Nystrom` (rank, min_dim): ``linear`` blocks with more
      than ``min_dim`` rows use a rank-``rank`` Nystrom approximation
      (default ``Nystrom()``: rank 32 past 512 rows). ``None``: every block
      is exact.
    output_factor: the output side of the ``linear`` blocks (dense, conv,
      attention projections, recurrent cells; up to 2048 outputs). The blocks
      above see a layer's inputs only; a Kronecker Fisher ``A (x) S`` also
      has a factor ``S`` over the outputs (K-FAC's ``E[delta delta^T]``).
      Since ``E[(A^-1 g)^T g]`` is proportional to ``S`` (plus the mean
      gradient's own term), its EMA, taken at the statistics steps, gives
      ``S`` without any output gradients: normalized to mean eigenvalue 1
      (the layer keeps its step's scale), eigenvalues clipped to [1/16, 16]
      and refreshed with the inverses, it multiplies the direction as
      ``A^-1 g R^-1/2``. Above 1024 outputs ``R`` is its 256 largest
      eigenpairs and its other eigenvalues' mean (``linalg.output_roots``).
      ``False``: the input side only (the paper's blocks); an int: the
      factor for layers of at most that many outputs. Its product costs a
      step ``2 (d_in+1) d_out^2`` FLOPs, ``d_out / (3 rows)`` of the layer's
      own forward and backward (rows: the batch's examples times
      positions): on wide layers at small batches a cap pays.
    layer_fisher: the local Fisher of dense and convolution layers:
      ``"linear"`` (one ``E[x~ x~^T]`` block shared by the output units),
      ``"relu"``, ``"sigmoid"``, ``"tanh"``, ``"elu"`` (a block per output
      unit weighted by ``nu(h_j)``), ``"softmax"`` (output layer, Kronecker
      product of the two expectations) or ``"none"`` (plain gradient). A single
      kind, a mapping from glob patterns of layer paths (``"layers/*"``) to
      kinds (unmatched layers get ``"linear"``), or a callable from the path
      string to a kind. Normalization and embedding layers get their own
      blocks unless a mapping or callable says ``"none"`` for them.
    weight_sharing: for a layer used several times per example (conv
      positions, scan steps, tokens, repeated calls; the activations' first
      axis is the examples axis): ``"reduce"`` (one loss per example) sums
      the statistic over each example's uses, as the per-example Fisher does;
      ``"expand"`` (a loss per position, averaged) averages over all uses;
      ``"auto"`` (default): ``"expand"`` for layers captured inside a scan
      (recurrent cells: back-propagated gradients fade over the steps, so a
      sum over them overstates the curvature the gradient sees, and a loss
      per step is exact with it) and layers along one position axis
      (tokens: a language model's loss is one per token), ``"reduce"`` for
      images (convolutions, layers over two or more position axes): see
      ``fisher.auto_sharing``. A single mode, a mapping from glob patterns
      to modes (unmatched layers get ``"auto"``), or a callable of the path.
    output_axes: how many trailing axes of a kernel are outputs (the rest
      are inputs; the block is that of the dense map over the flattened
      axes). ``None`` (default): the bias's axes (attention's q/k/v kernels
      ``(d_model, heads, head_dim)`` with bias ``(heads, head_dim)``: 2), or
      1 for a kernel without a bias (dense, conv, output projections
      ``(heads, head_dim, d_model)``). Bias-free multi-output kernels need it:
      ``output_axes={"*/query": 2, "*/key": 2, "*/value": 2}``. An int, a
      mapping from glob patterns, or a callable of the path (None: inferred).
    stacked: whether a module's params lead with a layer axis: a model that
      scans over its blocks (``nnx.vmap``-made blocks run by ``nnx.scan``,
      linen ``nn.scan`` with ``variable_axes={"params": 0}``). Each layer of
      a stack gets its own block, refreshed together with its stack's
      others (batched). ``None`` (default): inferred, from a kernel's bias
      (``(layers, *outputs)``) and, for a module without one (a bias-free
      kernel, a norm), from a module under the same parent found stacked
      with as many layers. A model without biases needs it named:
      ``stacked={"blocks/*": True}``. A bool, a mapping from glob patterns,
      or a callable of the path (None: inferred). The capture records a
      stack's activations with the layer axis first (``"stacked"``).
    axis_name: under ``jax.pmap`` (or ``shard_map``), the mapped axis whose
      devices each see a shard of the batch: the statistics are averaged over
      it (``jax.lax.pmean``), so every device holds the same state. Not needed
      with ``jax.jit`` and sharded arrays, where the batch mean is global.
    vmap_axis_name: under ``jax.vmap(..., axis_name=...)`` over independent
      models (seeds, widths), that axis: the steps that take statistics or
      refresh are decided once for all the models, so they stay conditionals.
      Without it a batched step counter turns every conditional into a
      select, and the statistics and inverses run at every step. Each model
      keeps its own statistics.
    refresh_axis: a device axis whose devices divide the refresh among them
      (each computes its columns of every exact inverse, its units of the
      per-unit blocks, its rows of the Nystrom bases, its share of the
      output factors' roots; one ``psum`` assembles each block on every
      device): the axis of a ``jax.pmap``/``shard_map`` running the step,
      or an axis of the mesh set by ``jax.set_mesh`` under ``jax.jit``.
      ``"auto"``: the mesh's axis where the mesh set by ``jax.set_mesh`` has
      exactly one axis of more than one device, else none (one device, no
      mesh, ``pmap``, a mesh of several axes). ``None``: every device
      computes every inverse.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Its ``init`` and ``update``
    are compiled once per argument shapes (``jax.jit``): called eagerly they
    run as fast as inside a jitted step, where they are inlined.

  References:
    Liu et al., Reconstructing Deep Neural Networks: Unleashing the
    Optimization Potential of Natural Gradient Descent, arXiv 2412.07441.

  Example:
    >>> import jax, jax.numpy as jnp, optax, sngd_jax
    >>> params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
    >>> x = jnp.ones((8, 3))
    >>> tx = optax.chain(sngd_jax.scale_by_sngd(), optax.sgd(0.1))
    >>> state = tx.init(params)
    >>> acts = {"dense": {"inputs": x, "outputs": x @ params["dense"]["kernel"]}}
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, activations=acts)
  """
  _validate(ema_decay, damping, relative_damping, max_condition, stats_every,
            inverse_every, layer_fisher, solver, nystrom)
  if isinstance(kl_clip, (int, float)) and kl_clip <= 0:  # not traced
    raise ValueError(f"kl_clip must be > 0 or None, got {kl_clip}")
  if isinstance(stats_positions, (jax.Array, np.ndarray)):
    raise ValueError(
        "stats_positions is an array: it sets a shape, so it must be static "
        "(under optax.inject_hyperparams pass static_args=('stats_positions',))")
  auto_positions = (isinstance(stats_positions, str)
                    and stats_positions == "auto")
  if stats_positions is not None and not auto_positions and (
      isinstance(stats_positions, bool) or not isinstance(stats_positions, int)
      or stats_positions < 1):
    raise ValueError('stats_positions must be None, "auto" or an integer >= 1, '
                     f"got {stats_positions!r}")
  if refresh_axis is not None and not isinstance(refresh_axis, str):
    raise ValueError('refresh_axis must be "auto", None or a mesh axis '
                     f"name, got {refresh_axis!r}")
  _validate_per_layer("weight_sharing", weight_sharing, WEIGHT_SHARING)
  widest_factor = output_factor_limit(output_factor)

  def sharing(path, entry):
    mode = _resolve(weight_sharing, path, "auto")
    if mode not in WEIGHT_SHARING:
      raise ValueError(f"weight_sharing for {path!r} is {mode!r}; expected "
                       f"one of {WEIGHT_SHARING}")
    if mode == "auto":  # sequences expand, images reduce
      return fisher.auto_sharing(entry)
    return mode

  def clip_weight(path, entry):
    # A recurrent cell's loss is often one per sequence (a classifier's): its
    # steps expand for the statistic, but the clip counts them all, as the
    # per-example Fisher sums over them.
    if (_resolve(weight_sharing, path, "auto") == "auto"
        and fisher.SCANNED in entry and "inputs" in entry):
      return fisher.uses_per_example(entry["inputs"])
    return 1

  def plan(tree):
    return plan_layers(tree, layer_fisher, nystrom, output_axes, stacked)

  def with_output_factor(layer):
    return takes_output_factor(layer, widest_factor)

  def buffer(params):
    return None if momentum is None else jax.tree.map(jnp.zeros_like, params)

  def init_fn(params):
    if not jax.tree.leaves(params) and not isinstance(params, (dict, list,
                                                               tuple)):
      # optax.tree_utils.tree_map_params's leafless placeholder for the
      # params: the per-layer dicts (keyed by layer, not params-shaped) are
      # single leaves here, so the real state's dicts pass through whole.
      zeros = [jnp.zeros([], jnp.int32) for _ in range(4)]
      return ScaleBySNGDState(zeros[0], jnp.zeros([]), "per layer",
                              "per layer", *zeros[1:], buffer(params),
                              jnp.zeros([], jnp.float32), "per layer",
                              "per layer")
    _warn_unmatched(params, layer_fisher=layer_fisher,
                    weight_sharing=weight_sharing, output_axes=output_axes,
                    stacked=stacked)
    return _inline_or_compiled(init, compiled_init, params)

  def init(params):
    layers, _ = plan(params)
    leaves = jax.tree.leaves(params)
    stats, preconditioners, output_stats, output_factors = {}, {}, {}, {}
    for stack in plan_stacks(layers, _dtype_of(leaves)):
      layer = stack.layers[0]
      dtype = _state_dtype(leaves[layer.leaves[0][0]].dtype)
      identity = stack.block.init(dtype)
      # The EMA starts at zero (stats_weight corrects its bias). Until a
      # first refresh succeeds, the preconditioner is the identity.
      precond = stack.block.refresh(identity, linalg.Damping(0.0, 0.0), solver)
      stats[stack.key] = _each_row(stack, jax.tree.map(jnp.zeros_like,
                                                       identity))
      preconditioners[stack.key] = _each_row(stack, precond)
      if with_output_factor(layer):
        eye = _each_row(stack, jnp.eye(layer.d_out, dtype=dtype))
        output_stats[stack.key] = jnp.zeros_like(eye)
        output_factors[stack.key] = (eye, jnp.copy(eye))
    # Distinct arrays (not one shared zero) so that the state can be donated.
    zeros = [jnp.zeros([], jnp.int32) for _ in range(4)]
    return ScaleBySNGDState(zeros[0], jnp.zeros([]), stats,
                            preconditioners, *zeros[1:], buffer(params),
                            jnp.zeros([], jnp.float32), output_stats,
                            output_factors)

  def update_fn(updates, state, params=None, *, activations=None, **extra):
    del extra
    return _inline_or_compiled(update, compiled_update, updates, state, params,
                               activations)

  def for_every_model(decision):
    # Under vmap the models' decisions agree (their counters do); one
    # unbatched decision keeps lax.cond a conditional.
    if vmap_axis_name is None:
      return decision
    return jax.lax.pmax(decision.astype(jnp.int32), vmap_axis_name) > 0

  def layers_and_entries(updates, activations):
    """The layers and, for those with activations, their entries: checked,
    a stack's without its marker, split by an explicit mesh along their
    examples (and layers) only."""
    layers, passthrough = plan(updates)
    by_path = {layer.path: layer for layer in layers}
    # Entries of layers without trainable parameters here (frozen by the
    # optimizer's filter, masked, opted out) are not used; a layer whose
    # entry is missing is named in the warning below.
    # The params' leaf paths, optax.masked's masked leaves among them (they
    # hold no arrays: the leaves' own indices skip them).
    held = [(path_str(path_tuple(path)), leaf) for path, leaf in
            jax.tree_util.tree_flatten_with_path(
                updates, is_leaf=lambda x: isinstance(x, optax.MaskedNode))[0]]
    given = flatten_activations(activations)
    _check_entries_have_params(given, [path for path, _ in held])
    entries = {path: {key: value for key, value in entry.items()
                      if key != fisher.CAPTURED}
               for path, entry in given.items() if path in by_path}
    leaf_paths = [path for path, leaf in held
                  if not isinstance(leaf, optax.MaskedNode)]
    unused = [leaf_paths[index] for layer in layers
              if layer.path not in entries for index, _, _ in layer.leaves]
    if passthrough or unused:
      others = sorted(set(given) - set(entries))
      warnings.warn("sngd: these parameters get the plain gradient (no "
                    f"activations or no local Fisher for them): "
                    f"{sorted(passthrough + unused)}" + (
                        "; activations has entries that no layer here "
                        f"takes (frozen, masked or opted out): {others}"
                        if others and unused else ""),
                    stacklevel=_user_stacklevel())
    for path, entry in entries.items():
      _check_entry(by_path[path], entry)
    entries = {path: jax.tree.map(lambda x, lead=1 + bool(
        by_path[path].stack): fisher.split_only_leading(x, lead),
                                  _stack_rows(by_path[path], entry))
               for path, entry in entries.items()}
    return layers, entries

  def statistics(state, stacks, entries):
    """``(stats, faults)``: each stack's EMA of its local Fisher statistic,
    all kept as they were where any is not finite.

    A stack's layers whose activations have the same shapes (a block's
    q/k/v, the same layer of every block) take theirs as one batch.
    """
    out, faults = {}, jnp.zeros([], jnp.int32)
    # The positions drawn depend on the step and the batch of layers only:
    # every device and every model draws the same ones.
    number = 0
    for stack in stacks:
      parts = stack.split(state.stats[stack.key])
      for mode, members in _statistics_batches(stack, entries, sharing):
        seed, number = fisher.position_seed(state.count, number), number + 1

        def statistic(entry, old, layer=members[0], mode=mode, seed=seed):
          limit = (AUTO_STATS_POSITIONS[mode] if auto_positions
                   else stats_positions)
          sampled = entry if limit is None else fisher.sampled_positions(
              entry, limit, seed)
          return _statistic_ema(layer, sampled, entry, old, ema_decay,
                                mode == "reduce", axis_name)

        rows = _Rows(members)
        indices = [stack.layers.index(layer) for layer in members]
        with jax.named_scope(f"sngd/{members[0].path}/statistics"):
          fresh, fault = rows.each(statistic)(
              rows.join([entries[layer.path] for layer in members]),
              rows.join([parts[i] for i in indices]))
        for i, part in zip(indices, rows.split(fresh)):
          parts[i] = part
        faults += jnp.sum(fault).astype(jnp.int32)
      out[stack.key] = stack.join(parts)
    # One layer's fault skips the step's statistics for every layer: the
    # EMA's weight, shared by all, stays where it was, so a layer that went
    # on without it would be corrected as if one step younger (its block
    # ~2x too large on the next step).
    return jax.tree.map(lambda new, old: jnp.where(faults == 0, new, old), out,
                        {stack.key: state.stats[stack.key] for stack in stacks}
                        ), faults

  def refreshed_blocks(state, stacks, stats, weight, refresh, divide_over):
    """``(preconditioners, faults)``, refreshed where ``refresh``.

    A cond per block kind and size (one cond around all of them hung
    XLA:CPU in jax 0.10.2, before the batched LAPACK calls were kept under
    jaxlib's split): the alike blocks of all its stacks (a transformer's
    q/k/v/out and MLP inputs of one width; smaller blocks of the family
    padded to the largest, ``_refresh_groups``) are refreshed as one batch,
    which ``divide_over`` (refresh_axis, resolved) divides among its devices.
    """
    # Until the EMA's weight nears 1 the Fisher is shrunk toward its mean
    # eigenvalue times I (as an EMA started at that multiple of I would be):
    # a few batches cannot estimate a block wider than they are, and the
    # shrinkage keeps the trace, so it holds for any input scale.
    warm_damping = (relative_damping + 1 - weight) / jnp.maximum(weight, 1e-30)
    preconditioners, faults = dict(state.preconditioners), jnp.zeros(
        [], jnp.int32)
    # The output factors' roots (an eigh each, ~9 d^3) in the refresh's cost.
    roots_cost = sum(9.0 * stack.layers[0].d_out ** 3 * max(stack.lead, default=1)
                     for stack in stacks if with_output_factor(stack.layers[0]))
    # Under refresh_axis the sizes stay apart: the divided refresh cuts each
    # block's columns by its own size.
    for group in _refresh_groups(stacks, stats, divide_over is None,
                                 roots_cost):
      own = _group_own(group)
      block = group[0].block if own is None else _group_block(group)
      padded_to = None if own is None else block

      def refreshed(group=group, own=own, block=block, padded_to=padded_to):
        old = _group_rows(group, state.preconditioners, padded_to)
        fresh, faults = _refreshed(
            block, _group_rows(group, stats, padded_to), old,
            linalg.Damping(damping, warm_damping.astype(
                jax.tree.leaves(old)[0].dtype), max_condition),
            solver, weight > 0, for_every_model, divide_over, own)
        return _group_parts(group, fresh, own is not None), faults

      with jax.named_scope(f"sngd/{group[0].name}/refresh"):
        fresh, group_faults = jax.lax.cond(
            refresh, refreshed, lambda group=group: (
                [state.preconditioners[stack.key] for stack in group],
                jnp.zeros([], jnp.int32)))
      preconditioners.update(
          (stack.key, part) for stack, part in zip(group, fresh))
      faults += group_faults
    return preconditioners, faults

  def output_factors(state, factored, gradients, directions, take_stats,
                     stat_faults, weight, refresh, divide_over):
    """``(output_stats, output_factors, stat_faults, inverse_faults)``.

    The output side of each block: the EMA of v^T g, taken at the
    statistics steps. With v = A^-1 g, its mean is the output factor S of a
    Kronecker Fisher A (x) S times trace(A^-1 A) / batch (plus the mean
    gradient's own term); the normalization drops the constant (docs/guide.md:
    Output factor). Its roots are refreshed with the inverses.
    """
    def output_statistics():
      out, faults = {}, jnp.zeros([], jnp.int32)
      for stack in factored:
        old = state.output_stats[stack.key]
        # Symmetrized at the refresh: here a transpose of a 512-output
        # layer's product cost more than the product.
        product = (jnp.matrix_transpose(directions[stack.key])
                   @ gradients[stack.key]).astype(old.dtype)
        if axis_name is not None:
          product = jax.lax.pmean(product, axis_name)
        ok = _all_finite(product)
        # Taken where the input statistics were (the EMA weight counts both).
        out[stack.key] = jnp.where(
            ok & (stat_faults == 0),
            ema_decay * old + (1 - ema_decay) * product, old)
        faults += (~ok).astype(jnp.int32)
      return out, faults

    with jax.named_scope("sngd/output_statistics"):
      fresh, stat_faults = jax.lax.cond(
          take_stats, output_statistics, lambda: (
              {stack.key: state.output_stats[stack.key]
               for stack in factored}, jnp.zeros([], jnp.int32)))
    stats = {**state.output_stats, **fresh}
    factors, inverse_faults = dict(state.output_factors), jnp.zeros(
        [], jnp.int32)
    # One cond per output size across the stacks, its roots divided among
    # divide_over's devices by factor.
    for group in _groups(factored, stats, lambda stack: stack.layers[0].d_out):
      def refreshed(group=group):
        old = _group_rows(group, state.output_factors)
        rate = weight.astype(old[0].dtype)
        fresh = output_factor_roots(_group_rows(group, stats) / rate, rate,
                                    divide_over)
        ok = _finite_blocks(fresh)
        return (_group_parts(group, _where_blocks(ok, fresh, old)),
                jnp.sum(~ok).astype(jnp.int32))

      with jax.named_scope(f"sngd/{group[0].name}/output_factor"):
        fresh, faults = jax.lax.cond(
            refresh, refreshed, lambda group=group: (
                [state.output_factors[stack.key] for stack in group],
                jnp.zeros([], jnp.int32)))
      factors.update((stack.key, part) for stack, part in zip(group, fresh))
      inverse_faults += faults
    return stats, factors, stat_faults, inverse_faults

  def momentum_metric(state, stacks, preconditioners, factors,
                      momentum_leaves, entries, row_weights):
    """``|m|_G^2``: the buffer's length in the metric of the new blocks."""
    def stack_metric(stack):
      precond = preconditioners[stack.key]
      m = stack.join([_gradient_matrix(layer, precond, momentum_leaves)
                      for layer in stack.layers])
      if stack.key in factors:  # |m|^2 in A (x) R^p: |m R^{p/2}|^2 in A
        m = m @ factors[stack.key][1]
      return jnp.sum(row_weights(stack) * stack.each(
          stack.block.metric, factors=True)(
              precond, m, stack.entry(entries)).astype(jnp.float32))

    norm = sum((stack_metric(stack) for stack in stacks),
               jnp.zeros([], jnp.float32))
    return jnp.where(jnp.isfinite(norm), norm, state.momentum_norm)

  def precondition(stacks, preconditioners, leaves, entries):
    """``(gradients, directions)``: each stack's gradient matrix ``g`` and
    its preconditioned direction ``v = P g``."""
    gradients, directions = {}, {}
    for stack in stacks:
      with jax.named_scope(f"sngd/{stack.name}/apply"):
        precond = preconditioners[stack.key]
        gradients[stack.key] = stack.join([
            _gradient_matrix(layer, precond, leaves) for layer in stack.layers])
        directions[stack.key] = stack.each(stack.block.apply)(
            precond, gradients[stack.key], stack.entry(entries))
    return gradients, directions

  def step_length(stacks, preconditioners, factors, gradients, directions,
                  row_weights):
    """``(directions, vg)``: the directions times their output factors, and
    the step's length in the blocks' metric, ``v.g = |v|_G^2``, summed over
    the stacks' rows with their clip weights."""
    directions, quadratics = dict(directions), []
    for stack in stacks:
      g = gradients[stack.key]
      if stack.key in factors:
        directions[stack.key] = directions[stack.key] @ factors[stack.key][0]
        quadratic = jnp.sum(directions[stack.key] * g, axis=(-2, -1))
      else:
        quadratic = stack.each(stack.block.quadratic)(
            preconditioners[stack.key], g, directions[stack.key])
      quadratics.append(jnp.ravel(row_weights(stack) * quadratic.astype(
          jnp.float32)))
    return directions, jnp.sum(jnp.concatenate(
        quadratics or [jnp.zeros([0], jnp.float32)]))

  def momentum_length(state, refresh, vg, gradients, buffer, weights, present,
                      metric):
    """``(norm, applied)``: ``|.|_G^2`` of the new buffer and of the step
    applied, before the clip.

    The buffer ``m' = beta m + v`` (or with Nesterov the step ``beta m' +
    v``): ``|beta m + v|_G^2 = beta^2 |m|^2 + 2 beta m.g + v.g``, with
    ``G v = g`` and ``|m|^2`` remeasured by ``metric`` in the blocks of a
    refresh. The clip bounds the step and the buffer kept alike.
    """
    if momentum is None:
      return vg, vg
    with jax.named_scope("sngd/momentum_norm"):
      momentum_norm = jax.lax.cond(refresh, metric,
                                   lambda: state.momentum_norm)
    cross = jnp.sum(jnp.stack([
        weights[layer.path] * jnp.vdot(buffer[index],
                                       gradients[index]).astype(jnp.float32)
        for layer in present for index, _, _ in layer.leaves]
                              + [jnp.zeros([], jnp.float32)]))
    norm = applied = jnp.maximum(momentum ** 2 * momentum_norm
                                 + 2 * momentum * cross + vg, 0.0)
    if nesterov:  # m'.g = beta m.g + v.g
      applied = jnp.maximum(norm, momentum ** 2 * norm + 2 * momentum * (
          momentum * cross + vg) + vg)
    return norm, applied

  def momentum_step(directions, buffer, scale, active):
    """``(step, new buffer)`` from the directions (leaves), the clip's
    ``scale`` shortening the preconditioned leaves (indices ``active``)."""
    def clip(leaves):
      return [(x * scale).astype(x.dtype) if i in active else x
              for i, x in enumerate(leaves)]

    if momentum is None:
      return clip(directions), None

    def heavy_ball(m, v):
      return (momentum * m + v).astype(m.dtype)

    new_buffer = clip(list(map(heavy_ball, buffer, directions)))
    if nesterov:
      return list(map(heavy_ball, new_buffer, clip(directions))), new_buffer
    return new_buffer, new_buffer

  def clip_scale(count, applied):
    """``(scale, clipped)``: the KL clip's factor for a step whose
    ``|.|_G^2`` is ``applied``."""
    if kl_clip is None:
      return 1.0, jnp.zeros([], jnp.int32)
    rate = learning_rate(count) if callable(learning_rate) else learning_rate
    scale = _kl_clip_scale(applied, rate, kl_clip)
    clipped = (scale < 1).astype(jnp.int32)
    # A cond's result is computed once: XLA copied the sum over every layer
    # that the scale reads into each leaf's fused product (a 6-block GPT's
    # update: 21k of its 62k HLO lines).
    return jax.lax.cond(clipped > 0, lambda: scale,
                        lambda: jnp.ones_like(scale)), clipped

  # The statistics, the inverses and the step all multiply in float32 (the
  # default on GPUs and TPUs keeps ~3 digits): a preconditioner's largest
  # entries are its smallest eigenvalues' directions, so a step rounded there
  # is wrong by up to the block's condition number times the rounding.
  @linalg.full_precision
  def update(updates, state, params, activations):
    if params is None:
      raise ValueError("scale_by_sngd needs params: call "
                       "tx.update(grads, state, params, activations=...)")
    if jax.tree.structure(params) != jax.tree.structure(updates):
      raise ValueError("params and updates have different tree structures")
    if activations is None:
      raise ValueError("scale_by_sngd needs activations=...: the inputs and "
                       "outputs of each layer in this forward pass "
                       "(sngd_jax.nnx_capture / linen_capture build them). "
                       + _missing_activations_hint())
    divide_over = (split.axis_of_mesh() if refresh_axis == "auto"
                   else refresh_axis)
    _check_mapped_axes(state.count, axis_name, vmap_axis_name, divide_over)
    layers, entries = layers_and_entries(updates, activations)
    leaves, treedef = jax.tree.flatten(updates)
    # A tensor-parallel model's gradients are gathered for the blocks (which
    # are replicated) and split again as they came at the end.
    specs = [fisher.explicit_spec(x) for x in leaves]
    leaves = [fisher.split_only_leading(x, 0) for x in leaves]
    stacks = [stack for stack in plan_stacks(layers, _dtype_of(leaves))
              if any(layer.path in entries for layer in stack.layers)]
    count = state.count

    # Statistics (one cond for every stack: on the steps in between the
    # program skips them all at once). A young EMA (weight below 0.9, its
    # first ~2/(1 - ema_decay) updates) takes a statistic every step and is
    # refreshed every stats_every steps: the warm-up lasts that many steps,
    # not that many intervals.
    young = state.stats_weight < 0.9
    take_stats = for_every_model((count % stats_every == 0) | young)
    fresh_stats, stat_faults = jax.lax.cond(
        take_stats, lambda: statistics(state, stacks, entries),
        lambda: ({stack.key: state.stats[stack.key] for stack in stacks},
                 jnp.zeros([], jnp.int32)))
    stats = {**state.stats, **fresh_stats}
    # The EMA's weight 1 - ema_decay^k.
    weight = jnp.where(take_stats & (stat_faults == 0),
                       ema_decay * state.stats_weight + (1 - ema_decay),
                       state.stats_weight).astype(state.stats_weight.dtype)

    # Refresh.
    refresh = for_every_model(((count % inverse_every == 0)
                               | (young & (count % stats_every == 0)))
                              & (weight > 0))
    preconditioners, inverse_faults = refreshed_blocks(
        state, stacks, stats, weight, refresh, divide_over)

    gradients, directions = precondition(stacks, preconditioners, leaves,
                                         entries)

    # Output factors.
    output_stats, factors = state.output_stats, state.output_factors
    factored = [stack for stack in stacks if with_output_factor(stack.layers[0])]
    if factored:
      output_stats, factors, faults, output_faults = output_factors(
          state, factored, gradients, directions, take_stats, stat_faults,
          weight, refresh, divide_over)
      stat_faults += faults
      inverse_faults += output_faults

    # Each layer's share of the clip's |.|_G^2, times its uses per example
    # where "auto" chose expand: the per-example Fisher sums over them; a
    # stack's rows of layers without activations count nothing.
    weights = {layer.path: clip_weight(layer.path, _one_layer(
        layer, entries[layer.path])) for stack in stacks
               for layer in stack.layers if layer.path in entries}

    def row_weights(stack):
      return stack.rows_of({path: weights.get(path, 0) for path in
                            (layer.path for layer in stack.layers)})

    directions, vg = step_length(stacks, preconditioners, factors, gradients,
                                 directions, row_weights)
    present = [layer for stack in stacks for layer in stack.layers
               if layer.path in entries]
    buffer = None if momentum is None else [
        fisher.split_only_leading(x, 0)
        for x in treedef.flatten_up_to(state.momentum)]
    # The momentum and the clip (``leaves`` are still the gradients; the
    # directions replace them once the clip's scale is known).
    norm, applied = momentum_length(state, refresh, vg, leaves, buffer,
                                    weights, present, lambda: momentum_metric(
                                        state, stacks, preconditioners,
                                        factors, buffer, entries, row_weights))
    scale, clipped = clip_scale(count, applied)
    for stack in stacks:
      for layer, part in zip(stack.layers, stack.split(directions[stack.key])):
        if layer.path in entries:
          _write_back(layer, part, leaves)
    leaves, buffer = momentum_step(leaves, buffer, scale, {
        index for layer in present for index, _, _ in layer.leaves})

    def split_as_they_came(leaves):
      return jax.tree.unflatten(treedef, [
          x if spec is None else jax.sharding.reshard(x, spec)
          for x, spec in zip(leaves, specs)])

    new_buffer, momentum_norm = None, state.momentum_norm
    if momentum is not None:
      new_buffer = split_as_they_came(buffer)
      momentum_norm = norm * jnp.square(scale)
    new_state = ScaleBySNGDState(
        optax.safe_increment(count), weight, stats, preconditioners,
        state.stats_faults + stat_faults,
        state.inverse_faults + inverse_faults, state.clipped + clipped,
        new_buffer, momentum_norm, output_stats, factors)
    return split_as_they_came(leaves), new_state

  compiled_init, compiled_update = jax.jit(init), jax.jit(update)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _statistic_ema(layer, sampled, entry, old, ema_decay, reduce,
                   axis_name=None):
  """EMA of the layer's statistic; a non-finite batch statistic is skipped.

  The statistic is the mean over the ``sampled`` entry's rows (all of
  ``entry``'s, or some positions of each example). With ``reduce`` (one loss
  per example) it sums over the uses of each example, as its Fisher does:
  times ``entry``'s uses per example; otherwise (``expand``: a loss per
  position) every use counts as an example and the statistic averages.
  Returns the new statistics and whether this batch's was skipped.
  """
  with jax.named_scope("statistics"):
    dtype = jax.tree.leaves(old)[0].dtype
    if fisher.WEIGHTS in sampled and not reduce:  # a mean over real positions
      weights = sampled[fisher.WEIGHTS]
      sampled = {**sampled, fisher.WEIGHTS: weights / jnp.maximum(
          jnp.mean(weights.astype(dtype)), jnp.finfo(dtype).tiny)}
    stat = layer.block.statistic(sampled, dtype)
    if reduce:
      stat = layer.block.scaled(stat, entry)
    stat = jax.tree.map(lambda s, o: s.astype(o.dtype), stat, old)
    if axis_name is not None:  # each device saw a shard of the batch
      stat = jax.lax.pmean(stat, axis_name)
    ok = _all_finite(stat)
    ema = jax.tree.map(lambda o, s: ema_decay * o + (1 - ema_decay) * s,
                       old, stat)
    return _where_blocks(ok, ema, old), ~ok


def _groups(stacks: list[Stack], blocks, key) -> list[list[Stack]]:
  """The stacks refreshed together: those whose ``key(stack)`` and blocks'
  dtype agree."""
  groups: dict[tuple, list[Stack]] = {}
  for stack in stacks:
    dtype = jax.tree.leaves(blocks[stack.key])[0].dtype
    groups.setdefault((key(stack), dtype), []).append(stack)
  return list(groups.values())


# Blocks of one family (exact linear, Nystrom of one rank) and several sizes
# are refreshed as one batch padded to the largest where that adds at most
# this share to the refresh's FLOPs: each size's refresh is a program of its
# own (a ResNet-18's nine sizes of convolution blocks: ~0.25 s of compile
# time each, docs/experiments.md).
_PADDING_SHARE = 0.05


def _refresh_groups(stacks: list[Stack], stats, pad: bool,
                    other_cost: float = 0.0) -> list[list[Stack]]:
  """Stacks with the same block (kind and size), whatever their outputs;
  with ``pad``, the groups of a padding family merged into its largest
  size's while the padding costs at most ``_PADDING_SHARE`` of the refresh
  (the blocks' and ``other_cost``, the output factors')."""
  groups = _groups(stacks, stats, lambda stack: stack.block)
  if not pad:
    return groups

  def rows(group):
    return sum(max(stack.lead, default=1) for stack in group)

  budget = _PADDING_SHARE * (other_cost + sum(
      rows(group) * group[0].block.refresh_cost() for group in groups))
  families: dict[tuple, list[list[Stack]]] = {}
  for group in groups:
    family = group[0].block.padding_family()
    dtype = jax.tree.leaves(stats[group[0].key])[0].dtype
    key = (family, dtype) if family else (id(group),)
    families.setdefault(key, []).append(group)
  merged = []
  for members in families.values():
    if len(members) == 1:
      merged += members
      continue
    largest = max(members, key=lambda group: group[0].block.n)

    def padding_cost(group, largest=largest):
      return rows(group) * (largest[0].block.refresh_cost()
                            - group[0].block.refresh_cost())

    joined = list(largest)
    for group in sorted(members, key=padding_cost):  # cheapest first
      if group is largest:
        continue
      if padding_cost(group) <= budget:
        budget -= padding_cost(group)
        joined += group
      else:
        merged.append(group)
    merged.append(joined)
  return merged


def _group_block(group: list[Stack]):
  """The block a group is refreshed as: its largest."""
  return max((stack.block for stack in group), key=lambda block: block.n)


def _group_rows(group: list[Stack], blocks, to=None):
  """A group's blocks as one batch: every stack's rows, in turn; each padded
  to the block ``to`` where it is smaller."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *[
      stack.block.pad(stack.batch(blocks[stack.key]), to)
      if to is not None and stack.block != to
      else stack.batch(blocks[stack.key]) for stack in group])


def _group_own(group: list[Stack]):
  """What the refresh of a group padded to its largest block needs of each
  row's own block (``fisher``'s ``own``), or None where all are alike."""
  if all(stack.block == group[0].block for stack in group):
    return None
  return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *[
      stack.block.own() for stack in group
      for _ in range(max(stack.lead, default=1))])


def _group_parts(group: list[Stack], batch, padded: bool = False) -> list:
  """``_group_rows``' inverse: each stack's part, in its own layout."""
  parts = _consecutive_rows(batch, [max(stack.lead, default=1)
                                    for stack in group])
  return [stack.unbatch(stack.block.cut(part) if padded else part)
          for stack, part in zip(group, parts)]


def output_factor_limit(output_factor) -> int:
  """The most outputs a layer given an output factor has: ``output_factor``
  ``True`` (``OUTPUT_MAX_DIM``), ``False`` (none) or a positive int."""
  if isinstance(output_factor, bool):
    return OUTPUT_MAX_DIM if output_factor else 0
  if isinstance(output_factor, numbers.Integral) and int(output_factor) > 0:
    return int(output_factor)
  raise ValueError("output_factor must be True, False or the most outputs "
                   f"a layer given one has (an int > 0), got {output_factor!r}")


def takes_output_factor(layer: Layer, limit: int) -> bool:
  """Whether a layer gets an output factor where layers of at most ``limit``
  outputs do (``output_factor_limit``): the ``linear`` blocks (exact or
  Nystrom) with 2 to ``limit`` outputs."""
  return (isinstance(layer.block, (fisher.Linear, fisher.NystromLinear))
          and 1 < layer.d_out <= limit)


def output_factor_roots(means, rate, refresh_axis=None):
  """``(R^-1/2, R^1/4)`` of each output statistic ``(k, d, d)`` (symmetrized;
  ``output_roots``); with ``refresh_axis`` its devices divide the work and
  one ``psum`` assembles it: each takes its share of the ``k`` exact roots,
  or of the rows of each low-rank root's products (above
  ``OUTPUT_EXACT_DIM`` outputs)."""
  rank = OUTPUT_RANK if means.shape[-1] > OUTPUT_EXACT_DIM else None

  def roots(means, rate, axis_name=None):
    return fisher.batched(lambda mean, rate: linalg.output_roots(
        (mean + mean.T) / 2, rate, OUTPUT_POWER, OUTPUT_RANGE, rank,
        axis_name=axis_name), (means,), rate)

  if refresh_axis is None:
    return roots(means, rate)
  if rank is not None:
    return split.on_axis(refresh_axis, lambda means, rate: roots(
        means, rate, refresh_axis), means, rate)

  def divided(means, rate):
    return split.by_rows(lambda mine: roots(mine, rate), means, refresh_axis,
                         fill=jnp.eye(means.shape[-1], dtype=means.dtype))

  return split.on_axis(refresh_axis, divided, means, rate)


def refresh_group(block, stacked, damping: linalg.Damping, solver,
                  refresh_axis=None, own=None):
  """The preconditioners of ``k`` alike blocks stacked on a leading axis (one
  attempt: no retry); with ``refresh_axis`` its devices divide the work;
  ``own``: each row's own block (``_group_own``) where they are padded."""
  if refresh_axis is None or own is not None:  # each block on every device
    def refreshed(s, o, d):
      return block.refresh(s, d, solver, **({} if o is None else {"own": o}))

    return fisher.batched(refreshed, (stacked, own),
                          jax.tree.map(jnp.asarray, damping))
  return split.on_axis(refresh_axis, lambda *operands: block.refresh_split(
      *operands, solver, refresh_axis), stacked, damping)


def _finite_blocks(tree) -> jax.Array:
  """``(k,)``: which of the ``k`` stacked blocks (leading axis) are finite."""
  return jnp.all(jnp.stack([_finite(x, axis=tuple(range(1, x.ndim)))
                            for x in jax.tree.leaves(tree)]), axis=0)


def _where_blocks(keep, new, old):
  """Block ``i`` of ``new`` where ``keep[i]``, else of ``old`` (leading axis);
  a scalar ``keep`` chooses the whole of ``new`` or of ``old``."""
  return jax.tree.map(lambda n, o: jnp.where(
      jnp.reshape(keep, keep.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def _refreshed(block, stats, old, damping: linalg.Damping, solver, valid,
               for_every_model, refresh_axis=None, own=None):
  """New damped inverses of ``k`` alike blocks stacked on a leading axis.

  A non-finite one is rejected (the last good preconditioner kept); without
  a condition cap it is first retried with more damping. Returns the
  preconditioners and how many first attempts failed. A block too close to
  singular for its damping is the usual cause, so one retry uses 100x the
  absolute damping and at least 1e-3 relative damping. Under a cap
  (``damping.max_condition``) a finite block's damped condition number is at
  most about the cap, which every solver meets in float32, so a failure
  there comes from values no damping cures (an overflowing trace) and the
  retry, a second copy of the refresh's program, is left out. Statistics
  that are not ``valid`` (none taken yet) keep the old preconditioners.
  ``for_every_model`` makes the decision to retry once for all models under
  vmap (each keeps its own result). With ``refresh_axis`` the devices of that axis share each attempt
  (``sngd_jax.split``); every device gets the whole result, so they all take
  the same decisions.
  """

  def attempt(boost, floor):
    fresh = jax.tree.map(lambda f, o: f.astype(o.dtype), refresh_group(
        block, stats, damping._replace(
            absolute=jnp.asarray(damping.absolute * boost),
            relative=jnp.maximum(damping.relative * boost, floor)),
        solver, refresh_axis, own),
        old)
    return fresh, _finite_blocks(fresh)

  if damping.max_condition is not None:
    with jax.named_scope("refresh"):
      fresh, ok = attempt(1.0, 0.0)
      return (_where_blocks(ok & valid, fresh, old),
              jnp.sum(~ok).astype(jnp.int32))

  # The retry is the loop's second iteration: the refresh's program (a
  # batch of factorizations and power iterations) is compiled once.
  def tried(carry):
    tries, fresh, good, first_ok = carry
    retry = tries > 0
    again, again_ok = attempt(jnp.where(retry, 100.0, 1.0),
                              jnp.where(retry, 1e-3, 0.0))
    return (tries + 1, _where_blocks(good, fresh, again), good | again_ok,
            jnp.where(retry, first_ok, again_ok))

  def another(carry):
    tries, _, good, _ = carry
    return (tries == 0) | ((tries < 2) & for_every_model(~jnp.all(good)))

  with jax.named_scope("refresh"):
    none = jnp.zeros(jax.tree.leaves(stats)[0].shape[:1], bool)
    _, fresh, good, ok = jax.lax.while_loop(
        another, tried, (jnp.zeros([], jnp.int32), old, none, none))
    return (_where_blocks(good & valid, fresh, old),
            jnp.sum(~ok).astype(jnp.int32))


def _inline_or_compiled(function, compiled, *args):
  """``function(*args)`` traced into the caller's program; called eagerly, ``compiled(*args)``.

  Eager, each op would dispatch on its own and every ``lax.cond`` recompile
  on every call (an update ran ~40x slower): one program compiled per
  shapes serves them all. Under the caller's ``jit``, ``vmap`` or ``pmap``
  the code is traced inline, as any Optax transform's: the caller's program
  is what it was (with a nested ``jit``, the 8-device sharding check hung in
  two of three runs on a loaded machine, jax 0.10.2 on CPU).
  """
  traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))
  return function(*args) if traced else compiled(*args)


def _kl_clip_scale(vg, learning_rate, kl_clip):
  """``min(1, sqrt(kl_clip / (lr^2 v . g)))``: the KL clip's factor.

  ``v . g = g^T P g`` (summed over the layers) is the step's squared length in
  the local Fisher's metric, so ``lr^2 v . g / 2`` is the KL divergence the
  step would cause if the blocks were the exact Fisher (Ba, Grosse & Martens
  2017).
  """
  kl = jnp.square(jnp.asarray(learning_rate, jnp.float32)) * vg
  return jnp.where(kl > kl_clip,
                   jnp.sqrt(kl_clip / jnp.where(kl > kl_clip, kl, 1.0)), 1.0)


def _gradient_matrix(layer: Layer, precond, leaves: list):
  """The layer's gradient leaves stacked as ``g (n, d_out)``, bias row last
  (a stack's ``(stack, n, d_out)``)."""
  dtype = jax.tree.leaves(precond)[0].dtype
  return jnp.concatenate([
      jnp.reshape(leaves[index], layer.lead + (rows, layer.d_out)).astype(dtype)
      for index, _, rows in layer.leaves], axis=-2)


def _write_back(layer: Layer, out, leaves: list):
  """Replaces the layer's leaves (in place in ``leaves``) by the rows of ``out``."""
  offset = 0
  for index, _, rows in layer.leaves:
    original = leaves[index]
    part = jax.lax.slice_in_dim(out, offset, offset + rows, axis=-2)
    leaves[index] = jnp.reshape(part, original.shape).astype(original.dtype)
    offset += rows


def _each_row(stack: Stack, tree):
  """One layer's initial state, repeated for each row of a stack."""
  return jax.tree.map(
      lambda x: jnp.broadcast_to(x, stack.lead + x.shape).copy(), tree)


def _stack_rows(layer: Layer, entry):
  """A stack's entry without its marker (its arrays lead with the layers)."""
  if not layer.stack:
    return entry
  return {key: value for key, value in entry.items() if key != fisher.STACKED}


def _one_layer(layer: Layer, entry):
  """The entry of one layer of a stack (its first; read for shapes only)."""
  if not layer.stack:
    return entry
  return jax.tree.map(lambda x: x[0], _stack_rows(layer, entry))


def sngd(
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float | None = None,
    weight_decay_mask: Any = None,
    kl_clip: float | None = 0.3,
    # The curvature.
    ema_decay: float = 0.95,
    damping: float = 1e-4,
    relative_damping: float = 1e-2,
    max_condition: float | None = 1e3,
    stats_every: int = 10,
    inverse_every: int = 100,
    stats_positions: int | str | None = "auto",
    solver: str = "cholesky",
    nystrom: Nystrom | None = Nystrom(),
    output_factor: bool | int = True,
    # The layers.
    layer_fisher: PerLayer = "linear",
    weight_sharing: PerLayer = "auto",
    output_axes: OutputAxes = None,
    stacked: Stacked = None,
    # The devices.
    axis_name: str | None = None,
    vmap_axis_name: str | None = None,
    refresh_axis: str | None = "auto",
) -> optax.GradientTransformationExtraArgs:
  """SNGD: the preconditioner alone, or the complete optimizer.

  ``sngd()`` is :func:`scale_by_sngd` and chains:
  ``optax.chain(sngd_jax.sngd(), optax.sgd(0.1))``. With a learning rate,
  ``sngd(0.1, momentum=0.9)`` is the complete optimizer: the preconditioned
  direction with heavy-ball or Nesterov momentum (the KL clip bounds the
  momentum step itself), then decoupled weight decay (``weight_decay`` times
  the parameters, outside the momentum, like AdamW), then ``-learning_rate``
  (a float or an Optax schedule).

  Args:
    learning_rate: a float or schedule; ``None`` returns a direction. The
      best rate depends on the model (search ``0.03`` to ``3.0``); without
      a search, ``3.0`` did best on the benchmark's tasks (README,
      "Choosing the learning rate").
    momentum: momentum decay (:func:`scale_by_sngd`'s ``momentum``); None or
      0 for none (None stays static under ``optax.inject_hyperparams``, so no
      buffer is made).
    nesterov: Nesterov momentum.
    weight_decay: decoupled weight decay; None or 0 for none.
    weight_decay_mask: ``optax.add_decayed_weights``' mask.
    kl_clip: bounds ``learning_rate^2 |m|_G^2``, the length of the step
      momentum takes (:func:`scale_by_sngd`).
    ema_decay, damping, relative_damping, max_condition, stats_every,
    inverse_every, stats_positions, solver, nystrom, output_factor: the
      curvature; see :func:`scale_by_sngd`.
    layer_fisher, weight_sharing, output_axes, stacked: the layers; see
      :func:`scale_by_sngd`.
    axis_name, vmap_axis_name, refresh_axis: the devices; see
      :func:`scale_by_sngd`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``activations=``.

  Example:
    >>> import jax.numpy as jnp, optax, sngd_jax
    >>> tx = sngd_jax.sngd(0.1, momentum=0.9)
    >>> state = tx.init({"dense": {"kernel": jnp.ones((3, 2))}})
  """
  no_momentum = momentum is None or _is_number(momentum) and momentum == 0
  parts = [scale_by_sngd(
      ema_decay=ema_decay, damping=damping, relative_damping=relative_damping,
      max_condition=max_condition, stats_every=stats_every,
      inverse_every=inverse_every,
      layer_fisher=layer_fisher, solver=solver, nystrom=nystrom,
      kl_clip=kl_clip,
      learning_rate=1.0 if learning_rate is None else learning_rate,
      momentum=None if no_momentum else momentum, nesterov=nesterov,
      weight_sharing=weight_sharing, output_axes=output_axes, stacked=stacked,
      axis_name=axis_name, vmap_axis_name=vmap_axis_name,
      stats_positions=stats_positions, refresh_axis=refresh_axis,
      output_factor=output_factor)]
  if not (weight_decay is None or _is_number(weight_decay) and weight_decay == 0):
    parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  if learning_rate is not None:
    parts.append(optax.scale_by_learning_rate(learning_rate))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)
