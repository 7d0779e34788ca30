"""Dividing the refresh among the devices of one mesh (or mapped) axis.

Every device holds the same statistics (their batch means are all-reduced),
so without help every device computes every inverse. With ``refresh_axis``
each block's refresh is cut into as many parts as the axis has devices: the
columns of an exact inverse, the units of per-unit blocks, the rows of a
Nystrom basis. A device computes its part, places it in a zero array of the
whole's shape, and one ``psum`` over the axis assembles the whole on every
device (a sum, not a gather, so the result is device-invariant, as
``shard_map``'s replication check and a replicated optimizer state need).

Under ``jax.pmap`` or ``jax.shard_map`` over the axis the parts are taken
where the step runs; under ``jax.jit`` on a mesh (``jax.set_mesh``) the
refresh is wrapped in a ``shard_map`` over that axis alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def stack(trees):
  """Trees of one structure stacked leaf by leaf on a new leading axis (a
  group of alike blocks)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def bound_size(axis: str) -> int | None:
  """The size of ``axis`` where a ``pmap``/``shard_map`` binds it, else None."""
  try:
    return jax.lax.axis_size(axis)
  except NameError:
    return None


def axis_of_mesh() -> str | None:
  """The current mesh's axis where it has exactly one of more than one
  device (a data-parallel mesh), else ``None`` (no mesh, one device, or a
  mesh of several axes: which of them holds the batch is the user's to say)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  sized = [name for name, size in zip(mesh.axis_names, mesh.axis_sizes)
           if size > 1]
  return sized[0] if len(sized) == 1 else None


def part(size: int, axis: str) -> tuple[jax.Array, int]:
  """``(index, per)``: this device's slice ``index*per : (index+1)*per`` of
  ``size`` items; ``per = ceil(size / devices)`` (the last slices may reach
  past ``size``: callers pad)."""
  devices = jax.lax.axis_size(axis)
  return jax.lax.axis_index(axis), -(-size // devices)


def assemble(mine: jax.Array, axis: str, index, per: int, size: int,
             dim: int) -> jax.Array:
  """Every device's ``per`` entries along ``dim`` put in place: the whole ``size``."""
  devices = jax.lax.axis_size(axis)
  shape = list(mine.shape)
  shape[dim] = per * devices
  whole = jax.lax.dynamic_update_slice_in_dim(
      jnp.zeros(shape, mine.dtype), mine, index * per, axis=dim)
  return jax.lax.slice_in_dim(jax.lax.psum(whole, axis), 0, size, axis=dim)


def my_rows(x: jax.Array, axis: str, dim: int = 0, fill=None):
  """``(rows, index, per)``: this device's slice of ``x`` along ``dim``.

  ``x`` is padded along ``dim`` to ``per * devices`` first, with zeros or
  with ``fill`` (an array of ``x``'s other dimensions, e.g. an identity
  block, where zeros would make an inverse fail).
  """
  size = x.shape[dim]
  index, per = part(size, axis)
  extra = per * jax.lax.axis_size(axis) - size
  if extra:
    if fill is None:
      pad = [(0, 0)] * x.ndim
      pad[dim] = (0, extra)
      x = jnp.pad(x, pad)
    else:
      filler = jnp.broadcast_to(jnp.expand_dims(fill, dim),
                                x.shape[:dim] + (extra,) + x.shape[dim + 1:])
      x = jnp.concatenate([x, filler.astype(x.dtype)], axis=dim)
  return jax.lax.dynamic_slice_in_dim(x, index * per, per, axis=dim), index, per


def by_rows(function: Callable, x: jax.Array, axis: str, fill=None):
  """``function(x)`` for a ``function`` that works row by row (along the
  leading axis of ``x`` and of each of its results): each device applies it
  to its rows (``my_rows``, padded with ``fill``) and one ``psum`` per result
  assembles the whole on every device."""
  rows, index, per = my_rows(x, axis, fill=fill)
  return jax.tree.map(lambda part: assemble(part, axis, index, per, x.shape[0],
                                            dim=0), function(rows))


def on_axis(axis: str, refresh: Callable, *operands):
  """``refresh(*operands)`` with ``axis`` bound: directly under ``pmap`` or
  ``shard_map`` over it, else in a ``shard_map`` over the current mesh's axis.

  The operands (statistics, damping) are replicated; so is the result.
  """
  if bound_size(axis) is not None:
    return refresh(*operands)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    raise ValueError(
        f"refresh_axis={axis!r}: no such axis here. Run the step under "
        f"jax.pmap / jax.shard_map over {axis!r}, or jit it inside "
        f"`with jax.set_mesh(mesh):` with a mesh that has an axis {axis!r} "
        f"(current mesh axes: {tuple(mesh.axis_names)})")
  replicated = tuple(PartitionSpec() for _ in operands)
  return jax.shard_map(refresh, in_specs=replicated,
                       out_specs=PartitionSpec(), axis_names={axis})(*operands)
