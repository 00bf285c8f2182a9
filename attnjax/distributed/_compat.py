"""Version shims and argument checks shared by the sequence-parallel ops.

`shard_map` moved from `jax.experimental.shard_map` (keyword `check_rep`) to
`jax.shard_map` (keyword `check_vma`); attnjax supports jax 0.10.2 - 0.12,
which all have `jax.shard_map`, but the fallback keeps older installs working.
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def shard_map(fn, *, mesh, in_specs, out_specs):
  """`jax.shard_map` with replication/VMA checking off.

  The checks are off because the ring's `custom_vjp` mixes per-device values
  (`axis_index`, ppermuted blocks) with values the checker would treat as
  replicated; the outputs are declared fully by `out_specs`.
  """
  if hasattr(jax, "shard_map"):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as _legacy  # jax < 0.6
  return _legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                 check_rep=False)


def axis_size(mesh: Mesh, name: str, argname: str) -> int:
  if not isinstance(mesh, Mesh):
    raise ValueError(
        f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  if name not in mesh.axis_names:
    raise ValueError(
        f"`{argname}`={name!r} is not an axis of the mesh; mesh axes are "
        f"{dict(mesh.shape)}.")
  return int(mesh.shape[name])


def check_batch_axis(mesh: Mesh, batch_axis: Optional[str], axis_name: str,
                     batch: int) -> None:
  if batch_axis is None:
    return
  if batch_axis == axis_name:
    raise ValueError(
        f"`batch_axis` and `axis_name` must differ, both are {axis_name!r}.")
  size = axis_size(mesh, batch_axis, "batch_axis")
  if batch % size:
    raise ValueError(
        f"batch size {batch} must be divisible by the size {size} of mesh "
        f"axis `batch_axis`={batch_axis!r}.")


def _explicit_axes(mesh: Mesh):
  axis_type = getattr(jax.sharding, "AxisType", None)
  types = getattr(mesh, "axis_types", None)
  if axis_type is None or types is None:
    return set()
  return {n for n, t in zip(mesh.axis_names, types)
          if t == axis_type.Explicit}


def place(x, mesh: Mesh, spec: PartitionSpec):
  """Moves `x` to `spec` on meshes with Explicit axes (a no-op on Auto ones).

  shard_map on an Explicit mesh requires inputs that already carry the
  in_specs; on an Auto mesh it reshards by itself.
  """
  if not _explicit_axes(mesh):
    return x
  return jax.sharding.reshard(x, NamedSharding(mesh, spec))
