"""Activations for ``scale_by_sngd``: pure JAX, Flax NNX and Flax linen.

Capture happens inside the model's one forward pass (no second run): layer
calls are intercepted, their inputs (and pre-activation outputs) recorded,
and the record returned beside the model's output. A layer used several times
(a module called twice, a cell unrolled over time) contributes the rows of
every use, so its statistics average over all uses.

What each layer records (the transform reads ``inputs``/``outputs``):

| layer                                | ``inputs``                                    | ``outputs``          |
|--------------------------------------|-----------------------------------------------|----------------------|
| Linear / Dense                       | ``x``                                          | ``h = x W + b``      |
| LinearGeneral / DenseGeneral (trailing input axes, any output axes: attention's q/k/v/out) | ``x`` with its input axes flattened | ``h`` with its output axes flattened |
| Einsum as a dense map (``"btd,dnh->btnh"``: contracts trailing input axes, output axes last) | ``x`` with the contracted axes flattened | ``h`` flattened likewise |
| Conv (strides, any padding, kernel and input dilation) | im2col patches ``(..., kh*kw*C_in)``, built lazily (``ConvInputs``) | ``h`` |
| ConvTranspose (SAME, VALID or explicit pads; not ``transpose_kernel``) | the patches of the input dilated by the strides (a stride-1 conv) | ``h`` |
| linen's ``DenseParams`` (``OptimizedLSTMCell``'s gates) | ``x`` | ``x W + b`` (unused by ``linear``: XLA drops it) |
| ``nnx.LoRA`` (two layers, recorded under ``lora_a`` and ``lora_b``) | ``x``; ``x A`` | ``x A``; ``x A B`` |
| Conv with ``feature_group_count = G > 1`` (depthwise too) | patches ``(..., G, kh*kw*C_in/G)``: one block shared by the groups | none (``linear`` kind only) |
| Embed                                | token ids                                      | none                 |
| Embed.attend (a tied output layer)   | ``attend``: the hidden states ``h`` it multiplies | none              |
| LayerNorm, BatchNorm, GroupNorm, RMSNorm, InstanceNorm | ``xhat``, the normalized input (the layer's own call at scale 1, bias 0), feature axes last and flattened, built lazily (``NormInputs``) | none |

Cells inside ``nnx.RNN``, ``nn.RNN``, ``nn.scan`` or any ``jax.lax.scan`` are
captured at every step, and layers inside ``nnx.remat``, ``nn.remat`` or
``jax.checkpoint`` applied during the forward pass. Layers stacked over a scan
(a model that scans over its blocks: ``nnx.scan``/``nn.scan``/``lax.scan``
over params with a leading layer axis) are recorded once for the stack, every
array leading with the layer axis ``(layers, B, ..., d)`` and marked
``"stacked": fisher.Stacked()``: each layer gets its own block. Layers in a
function checkpointed before the capture began are not captured: they get the
plain gradient, and the transform's warning names them. An entry recorded
inside a scan over time carries ``"scanned": fisher.Scanned()`` (a static
pytree node): ``weight_sharing="auto"`` expands those. Every entry the
captures return carries ``"captured": fisher.Captured()``: the transform
ignores such an entry where the params have no layer (one frozen by
``nnx.Optimizer``'s ``wrt``), while a hand-built entry there raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax import fisher
from sngd_jax.transform import path_tuple


def dense(layer: dict, x: jax.Array) -> tuple[jax.Array, dict]:
  """A dense layer for pure-JAX models: returns ``h`` and its activations entry.

  Example:
    >>> import jax.numpy as jnp, sngd_jax
    >>> layer = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> h, entry = sngd_jax.dense(layer, jnp.ones((4, 3)))
    >>> sorted(entry)
    ['inputs', 'outputs']
  """
  h = x @ layer["kernel"]
  if "bias" in layer:
    h = h + layer["bias"]
  return h, {"inputs": jax.lax.stop_gradient(x),
             "outputs": jax.lax.stop_gradient(h)}


# ----------------------------------------------------------------------------
# Entries, shared by NNX and linen (their layers have the same attributes).


def _flat_rows(x):
  return jnp.reshape(x, (-1, x.shape[-1]))


def _pads(padding, reach, sizes, strides):
  """``(low, high)`` pads per spatial axis and the ``jnp.pad`` mode, as Flax pads.

  Returns None for a padding Flax does not define for these dimensions.
  """
  if isinstance(padding, str):
    name = padding.upper()
    if name in ("SAME", "VALID"):
      return jax.lax.padtype_to_pads(sizes, reach, strides, name), "constant"
    if name in ("CIRCULAR", "REFLECT"):
      mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[name]
      return [((r - 1) // 2, r // 2) for r in reach], mode
    if name == "CAUSAL" and len(reach) == 1:
      return [(reach[0] - 1, 0)], "constant"
    return None
  if isinstance(padding, int):
    return [(padding, padding)] * len(reach), "constant"
  pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  return (pads, "constant") if len(pads) == len(reach) else None


def _transpose_pads(padding, reach, strides):
  """The pads of a ConvTranspose's dilated input, as ``lax.conv_transpose``
  sets them from Flax's padding; None for CIRCULAR (Flax wraps the output)."""
  if isinstance(padding, int):
    return [(padding, padding)] * len(reach)
  if not isinstance(padding, str):
    pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    return pads if len(pads) == len(reach) else None
  name = padding.upper()
  if name not in ("SAME", "VALID"):
    return None
  pads = []
  for r, s in zip(reach, strides):
    total = r + s - 2 + (max(r - s, 0) if name == "VALID" else 0)
    low = r - 1 if name == "VALID" or s > r - 1 else math.ceil(total / 2)
    pads.append((low, total - low))
  return pads


def _tuple(value, spatial):
  if value is None:
    return (1,) * spatial
  if isinstance(value, int):
    return (value,) * spatial
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class _ConvGeometry:
  """What im2col needs of a Flax Conv, for one input spatial size.

  Zero pads apply to the input after its dilation, as in
  ``lax.conv_general_dilated`` (Flax allows input dilation with explicit pads
  only; CIRCULAR/REFLECT/CAUSAL pad the raw input, ``mode``). With
  ``groups > 1`` the patches get a group axis before the last:
  ``(..., groups, kh*kw*C_in/groups)``, the rows of the kernel.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  dilation: tuple[int, ...]
  input_dilation: tuple[int, ...]
  pads: tuple[tuple[int, int], ...]
  mode: str  # jnp.pad mode
  groups: int

  @classmethod
  def of(cls, layer, shape) -> _ConvGeometry | None:
    kernel_size = tuple(layer.kernel_size) if not isinstance(
        layer.kernel_size, int) else (layer.kernel_size,)
    spatial = len(kernel_size)
    strides = _tuple(layer.strides, spatial)
    dilation = _tuple(layer.kernel_dilation, spatial)
    reach = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    if hasattr(layer, "transpose_kernel"):
      # ConvTranspose: a stride-1 convolution of its input dilated by the
      # strides (lax.conv_transpose); a transposed kernel is also flipped.
      pads = _transpose_pads(layer.padding, reach, strides)
      if layer.transpose_kernel or pads is None:
        return None
      return cls(kernel_size, (1,) * spatial, dilation, strides,
                 tuple((int(low), int(high)) for low, high in pads),
                 "constant", 1)
    padding = _pads(layer.padding, reach, shape[-(spatial + 1):-1], strides)
    if padding is None:
      return None
    return cls(kernel_size, strides, dilation,
               _tuple(layer.input_dilation, spatial),
               tuple((int(low), int(high)) for low, high in padding[0]),
               padding[1], layer.feature_group_count)

  def shape(self, shape):
    """The patches' shape for an input of ``shape``."""
    spatial = len(self.kernel_size)
    batch = shape[:-(spatial + 1)] or (1,)
    out = [((size - 1) * i + low + high - (k - 1) * d) // s + 1
           for size, (low, high), i, k, d, s in
           zip(shape[-(spatial + 1):-1], self.pads, self.input_dilation,
               self.kernel_size, self.dilation, self.strides)]
    rows = math.prod(self.kernel_size) * shape[-1] // self.groups
    group_axis = (self.groups,) if self.groups > 1 else ()
    return tuple(batch) + tuple(out) + group_axis + (rows,)

  def patches(self, x):
    """im2col from strided slices of the padded input, one per kernel tap."""
    spatial = len(self.kernel_size)
    if x.ndim == spatial + 1:
      x = x[None]
    batch_shape = x.shape[:-(spatial + 1)]
    x = jnp.reshape(x, (-1,) + x.shape[-(spatial + 1):])
    target = self.shape(x.shape)
    x = self._padded(x)
    out = target[1:spatial + 1]
    taps = []
    for offset in np.ndindex(*self.kernel_size):
      start = [0] + [o * d for o, d in zip(offset, self.dilation)] + [0]
      limit = [x.shape[0]] + [b + (n - 1) * s + 1 for b, n, s in
                              zip(start[1:-1], out, self.strides)] + [x.shape[-1]]
      taps.append(jax.lax.slice(x, start, limit, [1, *self.strides, 1]))
    # (N, out..., taps, groups, C_in/groups) -> groups first: the kernel's rows.
    patches = jnp.stack(taps, axis=-2).reshape(
        x.shape[:1] + tuple(out) + (len(taps), self.groups, -1))
    patches = jnp.moveaxis(patches, -2, -3)
    return jnp.reshape(patches, batch_shape + target[1:])

  def patches_at(self, x, ids):
    """The patches of ``x (N, spatial..., C)`` at the output positions ``ids``
    (indices into the flattened output grid): ``(N, len(ids), rows)``, from
    one gather of ``len(ids) * taps`` channel vectors (one group).

    Zero padding (without input dilation) is a mask on the gather, not a
    padded copy of the input: padding a ResNet's 28x28 inputs cost more than
    the statistic.
    """
    spatial = len(self.kernel_size)
    out = self.shape(x.shape)[1:spatial + 1]
    masked = self.mode == "constant" and set(self.input_dilation) == {1}
    lows = [low for low, _ in self.pads] if masked else [0] * spatial
    if not masked:
      x = self._padded(x)
    sizes = x.shape[1:-1]
    # Integer arithmetic on indices known to be in range: lax's division and
    # clamps, not jnp's floor division and index checks (each a dozen ops in
    # every convolution's statistics kernel).
    ids = ids.astype(jnp.uint32)
    coords = [jax.lax.rem(jax.lax.div(ids, np.uint32(step)), np.uint32(size)
                          ).astype(jnp.int32)
              for step, size in zip(_row_major_strides(out), out)]
    offsets = np.array(list(np.ndindex(*self.kernel_size)),  # (taps, spatial)
                       np.int32)
    # Per axis (len(ids), taps): the input coordinate each tap reads.
    reads = [c[:, None] * s + offsets[None, :, axis] * d - low for axis, (
        c, s, d, low) in enumerate(zip(coords, self.strides, self.dilation,
                                        lows))]
    inside = functools.reduce(jnp.logical_and, [
        (r >= 0) & (r < size) for r, size in zip(reads, sizes)])
    flat = sum(jax.lax.clamp(np.int32(0), r, np.int32(size - 1)) * np.int32(step)
               for r, size, step in zip(reads, sizes, _row_major_strides(sizes)))
    taps = jnp.reshape(x, (x.shape[0], -1, x.shape[-1])).at[
        :, jnp.reshape(flat, (-1,)).astype(jnp.uint32)].get(
            mode="promise_in_bounds")
    taps = jnp.where(jnp.reshape(inside, (1, -1, 1)), taps, 0)
    return jnp.reshape(taps, (x.shape[0], len(ids), -1))

  def _padded(self, x):
    if self.mode == "constant":  # zeros between the dilated input's entries too
      return jax.lax.pad(x, jnp.zeros([], x.dtype), [
          (0, 0, 0), *[(low, high, i - 1) for (low, high), i
                       in zip(self.pads, self.input_dilation)], (0, 0, 0)])
    return jnp.pad(x, [(0, 0), *self.pads, (0, 0)], mode=self.mode)


def _row_major_strides(shape) -> list[int]:
  """The flat index's step along each axis of a C-ordered ``shape``."""
  return [int(np.prod(shape[axis + 1:])) for axis in range(len(shape))]


class _LazyInputs:
  """Inputs built from ``source`` by ``materialize()``, which the transform
  calls inside its statistics branch only; ``shape`` (each subclass's) and
  ``dtype`` are the built array's."""

  source: jax.Array

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def dtype(self):
    return self.source.dtype


@jax.tree_util.register_pytree_node_class
class ConvInputs(_LazyInputs):
  """A convolution's input, turned into im2col patches only when used.

  The transform calls ``materialize()`` inside its statistics branch, so the
  patches are built only on the steps that update statistics
  (``stats_every``), not on every step. ``shape`` and ``dtype`` are those of
  the patches.
  """

  def __init__(self, x, geometry: _ConvGeometry):
    self.x = x
    self.geometry = geometry

  def tree_flatten(self):
    return (self.x,), self.geometry

  @classmethod
  def tree_unflatten(cls, geometry, children):
    return cls(children[0], geometry)

  @property
  def source(self):
    return self.x

  @property
  def shape(self):
    return self.geometry.shape(self.x.shape)

  @property
  def positions(self):
    """Patches per example: every output position, not the group axis."""
    shape = self.shape
    return math.prod(shape[1:-1]) // self.geometry.groups

  def materialize(self):
    return self.geometry.patches(self.x)

  def at_positions(self, ids):
    """The patches at output positions ``ids`` of each example,
    ``(N, len(ids), rows)``, built for those only; ``None`` where the input
    has more than one batch axis or the convolution has groups."""
    spatial = len(self.geometry.kernel_size)
    if self.geometry.groups > 1 or self.x.ndim != spatial + 2:
      return None
    return self.geometry.patches_at(self.x, ids)


def conv_patches(layer, x):
  """im2col patches of a Flax Conv's input, ordered like its kernel's rows.

  Built from strided slices of the padded input, one per kernel tap: memory
  moves only, far cheaper than ``lax.conv_general_dilated_patches`` (a
  convolution with an identity kernel). With feature groups the patches are
  ``(..., groups, kh*kw*C_in/groups)``. Returns ``None`` for a padding Flax
  does not define.
  """
  geometry = _ConvGeometry.of(layer, x.shape)
  return None if geometry is None else geometry.patches(x)


def _flatten_trailing(a, axes: int):
  """``a`` with its last ``axes`` axes flattened into one."""
  return jnp.reshape(a, a.shape[:a.ndim - axes] + (-1,))


def _general_entry(layer, x, y):
  """LinearGeneral/DenseGeneral: a dense map over the flattened axes.

  The contracted input axes must be ``x``'s trailing axes (attention's
  ``(heads, head_dim)`` output projection among them); any number of output
  axes (the q/k/v projections' ``(heads, head_dim)``).
  """
  features = layer.out_features if hasattr(layer, "out_features") else layer.features
  axis = layer.axis if hasattr(layer, "axis") else -1
  features = (features,) if isinstance(features, int) else tuple(features)
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  axes = tuple(sorted(a % x.ndim for a in axes))
  if axes != tuple(range(x.ndim - len(axes), x.ndim)):
    return None
  if getattr(layer, "batch_axis", None) or getattr(layer, "batch_dims", None):
    return None  # A kernel per batch index: not one dense map.
  return {"inputs": _flatten_trailing(x, len(axes)),
          "outputs": _flatten_trailing(y, len(features))}


def _einsum_entry(x, y, einsum_str):
  """Einsum as a dense map: ``x`` and ``y`` flattened over the kernel's axes.

  Supported when the kernel's axes are the contracted ones, which are the
  input's trailing axes, followed by the output axes, which end the result:
  ``"btd,df->btf"``, ``"btd,dnh->btnh"`` (attention's q/k/v) or
  ``"btnh,nhd->btd"``.
  """
  if not einsum_str or "," not in einsum_str or "->" not in einsum_str:
    return None
  lhs, rest = einsum_str.replace(" ", "").split(",", 1)
  rhs, out = rest.split("->")
  contracted = "".join(c for c in rhs if c not in out)
  kept = rhs[len(contracted):]
  if (not contracted or not kept or rhs != contracted + kept
      or not lhs.endswith(contracted)
      or out != lhs[:len(lhs) - len(contracted)] + kept):
    return None
  return {"inputs": _flatten_trailing(x, len(contracted)),
          "outputs": _flatten_trailing(y, len(kept))}


def _feature_axes(layer, ndim: int) -> tuple[int, ...]:
  """The axes a norm layer's scale and bias run over (BatchNorm's ``axis``...)."""
  axes = getattr(layer, "feature_axes", getattr(layer, "axis", -1))
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return tuple(sorted(a % ndim for a in axes))


@dataclasses.dataclass(frozen=True)
class _UnitNorm:
  """A norm layer's own call at scale 1 and bias 0, whose output is ``xhat``.

  Static (compared by value, so a jitted update is traced once): ``apply``
  runs ``layer`` (an NNX graphdef and call, an unbound linen module) from its
  variables; ``static`` and ``treedef`` rebuild the call's arguments around
  their arrays.
  """

  apply: Any  # (layer, variables, x, *args, **kwargs) -> y
  layer: Any
  treedef: Any
  static: tuple  # the call's non-array arguments; None where an array goes

  def __call__(self, variables, x, arrays):
    arrays = iter(arrays)
    args, kwargs = self.treedef.unflatten(
        [next(arrays) if leaf is None else leaf for leaf in self.static])
    def at_unit(path, v):
      name = path_tuple(path)[-1]
      return (jnp.ones_like(v) if name == "scale" else
              jnp.zeros_like(v) if name == "bias" else v)

    unit = jax.tree_util.tree_map_with_path(at_unit, variables)
    return self.apply(self.layer, unit, x, *args, **kwargs)

  @classmethod
  def of(cls, apply, layer, args, kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    static = tuple(None if a else leaf for leaf, a in zip(leaves, is_array))
    arrays = tuple(leaf for leaf, a in zip(leaves, is_array) if a)
    return cls(apply, layer, treedef, static), arrays


@jax.tree_util.register_pytree_node_class
class NormInputs(_LazyInputs):
  """A norm layer's normalized input ``xhat``, computed only when used.

  ``xhat`` is the layer's own output at scale 1 and bias 0 (its call run
  again on its input, with its variables), with the layer's feature axes
  (any axes, not only the last) moved last and flattened: ``(..., C)``. Read
  from the output, ``(y - bias) / scale``, it was lost where the scale is
  zero or tiny (zero-initialized residual branches, adaLN-zero): a step 149x
  too large at scale 0. As a convolution's patches, it is built inside the
  statistics branch only. ``shape`` and ``dtype`` are ``xhat``'s.
  """

  def __init__(self, x, variables, arrays, unit: _UnitNorm,
               axes: tuple[int, ...]):
    self.x, self.variables, self.arrays = x, variables, arrays
    self.unit, self.axes = unit, axes

  def tree_flatten(self):
    return (self.x, self.variables, self.arrays), (self.unit, self.axes)

  @classmethod
  def tree_unflatten(cls, static, children):
    return cls(*children, *static)

  @property
  def source(self):
    return self.x

  @property
  def shape(self):
    kept = tuple(n for i, n in enumerate(self.x.shape) if i not in self.axes)
    return kept + (math.prod(self.x.shape[i] for i in self.axes),)

  def materialize(self):
    with _not_recording():  # a linen layer's call would be intercepted
      y = self.unit(self.variables, self.x, self.arrays)
    last = tuple(range(y.ndim - len(self.axes), y.ndim))
    return _flatten_trailing(jnp.moveaxis(y, self.axes, last), len(self.axes))


def _nnx_norm_inputs(layer, call, x, args, kwargs) -> NormInputs:
  """An NNX norm's lazy ``xhat``: ``call`` is the class's own ``__call__``."""
  from flax import nnx
  graphdef, variables = nnx.split(layer)
  unit, arrays = _UnitNorm.of(_nnx_apply, (graphdef, call), args, kwargs)
  return NormInputs(x, variables, arrays, unit, _feature_axes(layer, x.ndim))


def _nnx_apply(layer, variables, x, *args, **kwargs):
  from flax import nnx
  graphdef, call = layer
  return call(nnx.merge(graphdef, variables), x, *args, **kwargs)


def _linen_norm_inputs(layer, x, args, kwargs) -> NormInputs:
  """A linen norm's lazy ``xhat``, from an unbound copy of the layer
  (nameless: alike layers then compare equal, and their statistics batch)."""
  unit, arrays = _UnitNorm.of(_linen_apply, layer.clone(parent=None, name=None),
                              args, kwargs)
  return NormInputs(x, dict(layer.variables), arrays, unit,
                    _feature_axes(layer, x.ndim))


def _linen_apply(module, variables, x, *args, **kwargs):
  # mutable: a BatchNorm in training moves its running statistics, discarded.
  return module.apply(variables, x, *args, mutable=True, **kwargs)[0]


def _entry(kind, layer, x, y, einsum_str=None):
  """The activations entry of one call (a norm's is built by the caller, who
  can run it again), or None if the layer is unsupported."""
  if kind == "dense":
    return {"inputs": x, "outputs": y}
  if kind == "dense_params":  # linen's DenseParams returns (kernel, bias)
    kernel, bias = y
    h = jnp.dot(x, kernel)  # dead code, dropped by XLA, unless a kind reads it
    return {"inputs": x, "outputs": h if bias is None else h + bias}
  if kind == "einsum":
    return _einsum_entry(x, y, einsum_str or layer.einsum_str)
  if kind == "general":
    return _general_entry(layer, x, y)
  if kind == "conv":
    geometry = _ConvGeometry.of(layer, x.shape)
    if geometry is None:
      return None
    entry = {"inputs": ConvInputs(x, geometry)}
    if geometry.groups == 1:  # per-unit kinds need one input row per output
      entry["outputs"] = y
    return entry
  if kind == "embed":
    return {"inputs": x}
  return {"attend": x}  # Embed.attend: the table as a tied output layer


def with_position_mask(activations: dict, mask) -> dict:
  """The activations with ``mask`` as the weights of every layer used at its positions.

  ``mask`` ``(B, T)`` (1 at real tokens, 0 at padding; any weights >= 0)
  goes to each entry whose records have positions ``(B, T)`` (token ids
  ``(B, T)``, inputs ``(B, T, d)``; a stack's with its layer axis first)
  as ``fisher.WEIGHTS`` ``(B, T, 1)``: its statistics then leave the padded
  positions out, as a masked loss does. Layers used at other positions (a
  head on pooled features) are left as they are. ``mask=None`` returns
  ``activations``. Hand-built entries take ``entry["weights"] = mask[...,
  None]`` likewise.

  Example:
    >>> import jax.numpy as jnp, sngd_jax
    >>> layer = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    >>> _, entry = sngd_jax.dense(layer, jnp.ones((4, 5, 3)))
    >>> mask = jnp.arange(5) < jnp.array([[5], [3], [2], [4]])
    >>> masked = sngd_jax.with_position_mask({"dense": entry}, mask)
    >>> masked["dense"]["weights"].shape
    (4, 5, 1)
  """
  if mask is None:
    return activations
  mask = jnp.asarray(mask)

  def positions(record, stacked):
    shape = tuple(record.shape[1:] if stacked else record.shape)
    floating = not jnp.issubdtype(record.dtype, jnp.integer)
    return shape[:-1] if floating else shape

  def attach(node):
    if not isinstance(node, dict):
      return node
    node = {key: attach(value) for key, value in node.items()}
    records = [node[name] for name in ("inputs", "attend") if name in node]
    stacked = fisher.STACKED in node
    if records and all(positions(r, stacked) == mask.shape for r in records):
      dtype = next((r.dtype for r in records
                    if jnp.issubdtype(r.dtype, jnp.floating)), jnp.float32)
      weights = mask.astype(dtype)[..., None]
      if stacked:
        weights = jnp.broadcast_to(weights, records[0].shape[:1] + weights.shape)
      node[fisher.WEIGHTS] = weights
    return node

  return attach(activations)


def _merge(entries: list[dict]) -> dict:
  """Every use of one layer, stacked along the positions of each example.

  Inputs keep their first axis as the examples (batch) axis, the convention
  the transform reads weight sharing from: uses of shape ``(B, ..., d)``
  become one ``(B, P, d)`` (token ids ``(B, P)``); uses with different batch
  sizes are flattened to rows ``(N, d)``. Uses of different sorts (an
  embedding's lookups and its ``attend``) stack under their own keys.
  """
  if len(entries) == 1:
    return jax.tree.map(jax.lax.stop_gradient, entries[0])
  merged: dict[str, Any] = {}
  for key in dict.fromkeys(k for e in entries for k in e):
    if key in (fisher.SCANNED, fisher.STACKED):  # a use inside a scan
      merged[key] = next(e[key] for e in entries if key in e)  # marks them all
      continue
    parts = [fisher.materialized(e[key]) for e in entries if key in e]
    ids = jnp.issubdtype(parts[0].dtype, jnp.integer)
    batch = {p.shape[0] if p.ndim > (0 if ids else 1) else None for p in parts}
    if len(batch) == 1 and None not in batch:
      tail = () if ids else (parts[0].shape[-1],)
      merged[key] = jnp.concatenate(
          [jnp.reshape(p, (p.shape[0], -1) + tail) for p in parts], axis=1)
    elif ids:
      merged[key] = jnp.concatenate([jnp.reshape(p, (-1,)) for p in parts])
    else:
      merged[key] = jnp.concatenate([_flat_rows(p) for p in parts])
  return jax.tree.map(jax.lax.stop_gradient, merged)


def _captured(uses: list[dict]) -> dict:
  """A layer's entry from its uses, marked as a capture's."""
  return {**_merge(uses), fisher.CAPTURED: fisher.Captured()}


def _nest(flat: dict[tuple, dict]) -> dict:
  """``{("a", "0"): entry}`` -> ``{"a": {"0": entry}}`` (keys as the params have them)."""
  tree: dict = dict(flat.get((), {}))  # the model itself may be a layer
  for path, entry in flat.items():
    if not path:
      continue
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    # A layer inside a layer (a LoRALinear's lora) nests in its entry.
    node[path[-1]] = {**node.get(path[-1], {}), **entry}
  return tree


# ----------------------------------------------------------------------------
# Recording, shared by NNX and linen. A frame holds the records of one JAX
# trace; ``jax.lax.scan`` (behind ``nnx.RNN``, ``nn.RNN``, ``nn.scan``, ``nnx.scan``)
# is wrapped so that each scan body records into its own frame and returns
# its records as extra scan outputs, stacked over the iterations;
# ``jax.checkpoint`` likewise. Records made under any other inner trace
# (``vmap`` inside the model, ``nn.scan``'s constancy check, a function
# checkpointed before the capture) are dropped: those layers get the plain
# gradient and the transform's warning names them.


class _Frame:

  def __init__(self):
    self.trace = self._current_trace()
    self.record: dict[Any, list] = defaultdict(list)
    # A linen layer's first parameter as its call saw it (an NNX key holds
    # its own): inside a scan, a slice of the scanned inputs marks a layer
    # stacked over the scan.
    self.probes: dict[Any, Any] = {}

  @staticmethod
  def _current_trace():
    from flax.core.tracers import current_trace
    return current_trace()

  def is_current(self) -> bool:
    """Whether JAX is tracing at this frame's level (not in an inner trace)."""
    return self._current_trace() == self.trace


_FRAMES: list[_Frame] = []


def _record(key, entry, probe=None):
  frame = _FRAMES[-1]
  if entry is not None and frame.is_current():
    frame.record[key].append(entry)
    frame.probes[key] = probe


class _Ref:
  """An NNX layer's key: its first parameter's value, compared by identity.

  Identity survives ``nnx.scan``, which hands the outer values to
  ``lax.scan`` as carries, where module objects are rebuilt inside the body.
  """

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _Ref) and other.value is self.value


def _outer_key(key, probe, carry, init, xs=(), outer_xs=()):
  """``(key outside the scan, stacked)`` of an inner record.

  ``stacked``: the layer's parameter (an NNX key's value, else ``probe``) is
  a slice of the scanned inputs ``xs`` (``outer_xs`` outside): one layer of
  a stack the scan runs through, keyed by the stacked parameter. ``carry``,
  ``init`` and ``xs`` are flat leaf lists, taken before the body ran (NNX
  consumes its carried deques).
  """
  value = key.value if isinstance(key, _Ref) else probe
  for inner, outer in zip(xs, outer_xs):
    if value is not None and inner is value:
      return (_Ref(outer) if isinstance(key, _Ref) else key), True
  if not isinstance(key, _Ref):
    return key, False  # linen scope paths are the same inside and out.
  for inner, outer in zip(carry, init):
    if inner is key.value:
      return _Ref(outer), False
  return key, False  # A closed-over value is the outer one.


def _examples_first(stacked):
  """A record stacked over scan steps, ``(steps, B, ...)`` -> ``(B, steps, ...)``.

  The examples axis stays first; a record without one (an unbatched input)
  is left as it is.
  """
  if isinstance(stacked, ConvInputs):
    batched = stacked.x.ndim > len(stacked.geometry.kernel_size) + 2
    return ConvInputs(jnp.moveaxis(stacked.x, 0, 1), stacked.geometry) if (
        batched) else stacked
  features = 0 if jnp.issubdtype(stacked.dtype, jnp.integer) else 1
  return jnp.moveaxis(stacked, 0, 1) if stacked.ndim > features + 1 else stacked


def _capturing_scan(original):
  """``lax.scan`` whose body's records come out stacked over its iterations."""

  def scan(f, init, xs=None, length=None, **kwargs):
    layouts = []
    init_leaves, xs_leaves = jax.tree.leaves(init), jax.tree.leaves(xs)

    def body(carry, x):
      carry_leaves, x_leaves = jax.tree.leaves(carry), jax.tree.leaves(x)
      frame = _Frame()
      _FRAMES.append(frame)
      try:
        carry_out, y = f(carry, x)
      finally:
        _FRAMES.pop()
      # Each record leaves the loop once: a slice of the scanned inputs is
      # taken from them, a constant (the gates' slopes) is broadcast outside,
      # and an array recorded by several layers (a GRU's hr, hz, hn read the
      # same h) is one scan output. The loop's per-step copies of them were a
      # fifth of the MNIST-1D GRU's step.
      layouts[:], outputs, sources = [], [], {}
      for key, uses in frame.record.items():
        outer_key, stacked = _outer_key(key, frame.probes[key], carry_leaves,
                                        init_leaves, x_leaves, xs_leaves)
        layout = {}
        for name, value in _merge(uses).items():
          if name in (fisher.SCANNED, fisher.STACKED):
            if stacked:  # a recurrent cell inside a stacked block stays one
              layout[name] = ("marker", value)
            continue
          if isinstance(value, NormInputs):  # its axes would move when stacked
            value = value.materialize()
          raw = uses[0][name] if len(uses) == 1 else value
          sliced = next((i for i, leaf in enumerate(x_leaves) if raw is leaf),
                        None)
          if isinstance(raw, np.ndarray):
            layout[name] = ("constant", raw)
          elif sliced is not None:
            layout[name] = ("xs", sliced)
          else:
            if id(raw) not in sources:
              sources[id(raw)] = len(outputs)
              outputs.append(value)
            layout[name] = ("output", sources[id(raw)])
        layouts.append((outer_key, stacked, layout))
      return carry_out, (y, outputs)

    carry, (ys, outputs) = original(body, init, xs, length, **kwargs)
    steps = length if length is not None else xs_leaves[0].shape[0]
    for key, stacked, layout in layouts:
      entry = {}
      for name, (source, where) in layout.items():
        if source == "marker":
          value = where
        elif source == "output":
          value = outputs[where]
        elif source == "xs":
          value = jax.lax.stop_gradient(xs_leaves[where])
        else:
          value = np.broadcast_to(where, (steps,) + where.shape)
        # A stack's entry leads with its layers; a cell's uses are steps of
        # each example.
        entry[name] = value if stacked else _examples_first(value)
      # Marked: its uses are the scan's iterations (weight_sharing "auto"),
      # or its rows are the layers of a stack.
      marker = ({fisher.STACKED: fisher.Stacked()} if stacked
                else {fisher.SCANNED: fisher.Scanned()})
      _record(key, {**entry, **marker})
    return carry, ys

  return scan


def _capturing_checkpoint(original):
  """``jax.checkpoint`` whose function returns its records as extra outputs.

  Each use is recorded again outside, under the outer key of the layer's
  parameter: ``nnx.remat`` rebuilds its modules from its arguments and hands
  the parameters back as outputs, which then replace the model's values.
  """

  def checkpoint(fun, *args, **kwargs):
    keys, inner_leaves = [], []

    def recording(*args, **call_kwargs):
      frame = _Frame()
      _FRAMES.append(frame)
      try:
        out = fun(*args, **call_kwargs)
      finally:
        _FRAMES.pop()
      inner_leaves[:] = jax.tree.leaves((out, args, call_kwargs))
      keys[:] = list(frame.record)
      return out, [frame.record[key] for key in keys]

    checkpointed = original(recording, *args, **kwargs)

    @functools.wraps(fun)
    def call(*args, **call_kwargs):
      out, records = checkpointed(*args, **call_kwargs)
      outer_leaves = jax.tree.leaves((out, args, call_kwargs))
      for key, uses in zip(keys, records):
        outer_key, _ = _outer_key(key, None, inner_leaves, outer_leaves)
        for use in uses:
          _record(outer_key, use)
      return out

    return call

  return checkpoint


@contextlib.contextmanager
def _not_recording():
  """A frame that records nothing: for a layer's call made by the capture."""
  frame = _Frame()
  frame.trace = object()  # never the current trace
  _FRAMES.append(frame)
  try:
    yield
  finally:
    _FRAMES.pop()


@contextlib.contextmanager
def _capturing():
  """A top frame, with ``lax.scan`` and ``jax.checkpoint`` wrapped, for one forward pass."""
  frame = _Frame()
  _FRAMES.append(frame)
  originals = jax.lax.scan, jax.checkpoint
  jax.lax.scan = _capturing_scan(originals[0])
  jax.checkpoint = jax.remat = _capturing_checkpoint(originals[1])
  try:
    yield frame.record
  finally:
    jax.lax.scan = originals[0]
    jax.checkpoint = jax.remat = originals[1]
    _FRAMES.pop()


# ----------------------------------------------------------------------------
# Recurrent cells: the slope of the function each gate layer feeds.
#
# Flax's cells apply a sigmoid (the gates) or a tanh (the candidate) to each
# sum ``x W_i + h W_h``. A unit behind ``f`` has the per-unit block
# ``E[f'(h)^2 x~ x~^T]``; the cell records on each of its layers' entries
# (``fisher.SLOPES``) the bound ``f'(0)^2`` of that weight (1/16 for a sigmoid,
# 1 for a tanh; averaged over the gates of a fused layer), which the ``linear``
# block multiplies its rows by. Without it a gate was stepped as if it moved
# the cell one for one: 3-20x less than Adam moves it. The slopes at the
# actual pre-activations trained faster at first but let saturated gates
# (slopes near 0) take steps that undid the training at small learning rates
# (docs/experiments.md, 2026-12-05).


def _peak_squared_slope(function) -> float:
  """``f'(0)^2``: a sigmoid's and a tanh's largest; 1 where it is 0 or past 1
  (a ReLU, whose slope at 0 JAX takes as 0). Taken on one unit, ``(1,)``,
  so that a function over the last axis (a softmax) runs too."""
  with jax.ensure_compile_time_eval():
    slope = float(jax.jvp(function, (jnp.zeros((1,)),), (jnp.ones((1,)),))[1][0])
  return slope ** 2 if 0 < slope ** 2 <= 1 else 1.0


def _cell_rules() -> dict[type, dict[str, tuple[str, ...]]]:
  """``{cell class: {layer: the functions (cell attributes) its outputs go
  into, one per gate it holds}}``, by exact type (a subclass may change
  ``__call__``)."""
  from flax import linen as nn
  from flax import nnx
  gate, candidate = ("gate_fn",), ("activation_fn",)

  def sides(gates, input_names, hidden_names):
    return {name: fn for names in (input_names, hidden_names)
            for name, fn in zip(names, gates)}

  def fused(*gates):
    return {"dense_i": sum(gates, ()), "dense_h": sum(gates, ())}

  gru = (gate, gate, candidate)
  lstm = (gate, gate, candidate, gate)
  linen_lstm = sides(lstm, ("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho"))
  return {
      nn.GRUCell: sides(gru, ("ir", "iz", "in"), ("hr", "hz", "hn")),
      nn.LSTMCell: linen_lstm, nn.OptimizedLSTMCell: linen_lstm,
      nn.MGUCell: sides((gate, candidate), ("if", "in"), ("hf", "hn")),
      nn.SimpleCell: sides((candidate,), ("i",), ("h",)),
      nnx.GRUCell: fused(*gru), nnx.OptimizedLSTMCell: fused(*lstm),
      nnx.LSTMCell: sides(lstm, ("ii", "if_", "ig", "io"),
                          ("hi", "hf", "hg", "ho")),
      nnx.SimpleCell: fused(candidate)}


def _record_slopes(rule, cell, key_of):
  """Adds ``fisher.SLOPES`` to the entries a cell's call just recorded;
  ``key_of(name)`` is the record key of the cell's layer ``name``."""
  frame = _FRAMES[-1]
  if not frame.is_current():
    return
  for name, functions in rule.items():
    key = key_of(name)
    if key is None or not frame.record.get(key):
      continue
    entry = frame.record[key][-1]
    slope = np.mean([_peak_squared_slope(getattr(cell, f)) for f in functions])
    x = entry["inputs"]
    # A constant, not a traced value: a scan broadcasts it outside its loop.
    entry[fisher.SLOPES] = np.full(x.shape[:-1] + (1,), slope, x.dtype)


# ----------------------------------------------------------------------------
# Flax NNX.


def _call_einsum_str(args, kwargs):
  """An ``einsum_str`` given to an Einsum layer's call (it overrides the layer's)."""
  return args[0] if args and isinstance(args[0], str) else kwargs.get("einsum_str")


def _nnx_kinds():
  from flax import nnx
  return {nnx.Linear: "dense", nnx.LinearGeneral: "general",
          nnx.Einsum: "einsum", nnx.Conv: "conv", nnx.ConvTranspose: "conv",
          nnx.Embed: "embed", nnx.LayerNorm: "norm", nnx.BatchNorm: "norm",
          nnx.GroupNorm: "norm", nnx.RMSNorm: "norm", nnx.InstanceNorm: "norm",
          nnx.LoRA: "lora"}


def _nnx_ref(module):
  for name in ("kernel", "embedding", "scale", "bias"):
    variable = getattr(module, name, None)
    if variable is not None:
      return _Ref(variable.get_value())
  return None


def _nnx_keys(module) -> list[tuple[tuple[str, ...], _Ref]]:
  """Where a module's records go: ``(path suffix, key)`` for each of its layers.

  ``nnx.LoRA`` is two dense layers without a bias, ``x -> x A -> x A B``,
  recorded under its factors' names (``plan_layers`` makes each a layer).
  """
  from flax import nnx
  if isinstance(module, nnx.LoRA):
    return [((name,), _Ref(getattr(module, name).get_value()))
            for name in ("lora_a", "lora_b")]
  key = _nnx_ref(module)
  return [] if key is None else [((), key)]


@contextlib.contextmanager
def _patched_nnx_calls():
  """Wraps ``__call__`` of the NNX layer classes for the duration of a trace."""
  from flax import nnx

  methods = {(cls, "__call__"): kind for cls, kind in _nnx_kinds().items()}
  methods[(nnx.Embed, "attend")] = "attend"
  originals = {(cls, name): getattr(cls, name) for cls, name in methods}

  def wrap(kind, original):
    def call(self, x, *args, **kwargs):
      y = original(self, x, *args, **kwargs)
      if kind == "lora":
        (_, key_a), (_, key_b) = _nnx_keys(self)
        h = jnp.dot(x, key_a.value)
        _record(key_a, {"inputs": x, "outputs": h})
        _record(key_b, {"inputs": h, "outputs": jnp.dot(h, key_b.value)})
        return y
      key = _nnx_ref(self)
      if key is not None:
        _record(key, {"inputs": _nnx_norm_inputs(self, original, x, args, kwargs)}
                if kind == "norm" else
                _entry(kind, self, x, y, _call_einsum_str(args, kwargs)))
      return y
    return call

  def wrap_cell(rule, original):
    def call(self, *args, **kwargs):
      out = original(self, *args, **kwargs)
      _record_slopes(rule, self, lambda name: _nnx_ref(getattr(self, name, None)))
      return out
    return call

  rules = {cls: rule for cls, rule in _cell_rules().items()
           if issubclass(cls, nnx.Module)}
  originals.update({(cls, "__call__"): cls.__call__ for cls in rules})
  try:
    for (cls, name), kind in methods.items():
      setattr(cls, name, wrap(kind, originals[(cls, name)]))
    for cls, rule in rules.items():
      cls.__call__ = wrap_cell(rule, originals[(cls, "__call__")])
    yield
  finally:
    for (cls, name), original in originals.items():
      setattr(cls, name, original)


def nnx_capture(model, *args, position_mask=None, **kwargs
                ) -> tuple[Any, dict]:
  """Runs an ``nnx.Module`` once and returns ``(output, activations)``.

  ``activations`` mirrors ``nnx.state(model, nnx.Param)``: pass it to
  ``optimizer.update(model, grads, activations=activations)``.

  ``position_mask`` (``(B, T)``, 1 at real tokens, 0 at padding; optional)
  weights the statistics of every layer used at those positions (see
  ``with_position_mask``); the other arguments go to the model.

  Example:
    >>> import jax.numpy as jnp, optax, sngd_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> optimizer = nnx.Optimizer(model, sngd_jax.sngd(0.1), wrt=nnx.Param)
    >>> def loss_fn(model, x):
    ...   y, acts = sngd_jax.nnx_capture(model, x)
    ...   return jnp.mean(y ** 2), acts
    >>> (loss, acts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
    ...     model, jnp.ones((8, 3)))
    >>> _ = optimizer.update(model, grads, activations=acts)
  """
  from flax import nnx

  with _capturing() as record, _patched_nnx_calls():
    output = model(*args, **kwargs)
  flat = {}
  for path, module in nnx.iter_modules(model):
    for suffix, key in _nnx_keys(module):
      if key in record and tuple(path) + suffix not in flat:
        flat[tuple(path) + suffix] = _captured(record[key])
  return output, with_position_mask(_nest(flat), position_mask)


# ----------------------------------------------------------------------------
# Flax linen.


def _linen_kinds():
  from flax import linen as nn
  from flax.linen.recurrent import DenseParams  # OptimizedLSTMCell's gates
  return {nn.Dense: "dense", nn.DenseGeneral: "general", nn.Einsum: "einsum",
          DenseParams: "dense_params", nn.Conv: "conv", nn.ConvTranspose: "conv",
          nn.Embed: "embed", nn.LayerNorm: "norm", nn.BatchNorm: "norm",
          nn.GroupNorm: "norm", nn.RMSNorm: "norm", nn.InstanceNorm: "norm"}


def linen_capture(module, variables, *args, position_mask=None, **kwargs
                  ) -> tuple[Any, dict]:
  """``module.apply(variables, *args, **kwargs)`` plus the activations.

  ``module`` is the linen module, or its bound ``apply`` (a ``TrainState``'s
  ``apply_fn``).

  Returns ``(apply's result, activations)``; ``activations`` mirrors
  ``variables["params"]``. ``position_mask`` is ``nnx_capture``'s; other
  keyword arguments go to ``apply`` (``mutable=``, ``rngs=``, ``method=``...).

  Example:
    >>> import jax, jax.numpy as jnp, sngd_jax
    >>> from flax import linen as nn
    >>> model = nn.Dense(2)
    >>> variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    >>> y, acts = sngd_jax.linen_capture(model, variables, jnp.ones((4, 3)))
    >>> acts["inputs"].shape
    (4, 3)
  """
  from flax import linen as nn

  if not isinstance(module, nn.Module) and isinstance(
      getattr(module, "__self__", None), nn.Module):
    module = module.__self__  # ``state.apply_fn``: the bound ``model.apply``
  kinds, rules = _linen_kinds(), _cell_rules()

  def interceptor(next_fun, call_args, call_kwargs, context):
    y = next_fun(*call_args, **call_kwargs)
    layer = context.module
    if context.method_name == "__call__" and type(layer) in rules:
      path = tuple(layer.scope.path)
      _record_slopes(rules[type(layer)], layer, lambda name: path + (name,))
      return y
    kind = next((k for cls, k in kinds.items() if isinstance(layer, cls)), None)
    if kind == "embed" and context.method_name == "attend":
      kind = "attend"
    elif context.method_name != "__call__":
      return y
    if kind is None:
      return y
    params = layer.variables.get("params", {})
    probe = next((params[name] for name in ("kernel", "embedding", "scale",
                                            "bias") if name in params), None)
    x, rest = call_args[0], call_args[1:]
    _record(tuple(layer.scope.path),
            {"inputs": _linen_norm_inputs(layer, x, rest, call_kwargs)}
            if kind == "norm" else
            _entry(kind, layer, x, y, _call_einsum_str(rest, call_kwargs)),
            probe)
    return y

  with _capturing() as record, nn.intercept_methods(interceptor):
    output = module.apply(variables, *args, **kwargs)
  flat = {path: _captured(entries) for path, entries in record.items()}
  return output, with_position_mask(_nest(flat), position_mask)
