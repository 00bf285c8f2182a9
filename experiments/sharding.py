"""Mesh, batch and parameter sharding for the experiment binaries.

Everything here is JAX's own runtime: `jax.sharding.Mesh`, `NamedSharding`,
`jax.device_put`, `jax.make_array_from_process_local_data` and
`jax.distributed.initialize`. A binary with a `mesh` config string does:

    from experiments import sharding
    sharding.maybe_initialize_distributed(config.get("coordinator", ""))
    mesh = sharding.make_mesh(config.mesh)            # e.g. "data:2,seq:4"
    model, opt = build(...)                           # NNX modules
    sharding.shard_nnx(model, opt, mesh=mesh)         # params + optimizer state
    step, state = ckpt.restore_or({"nnx": nnx_state(model, opt), ...})
    nnx_load((model, opt), state["nnx"])              # restored *into* the mesh
    ...
    x, y = sharding.shard_batch((x, y), mesh, seq_axis="seq")  # per step
    loss = train_step(model, opt, x, y)               # nnx.jit, unchanged

Checkpoints written on N devices restore on M devices: `Checkpointer.
restore_or` builds its restore target from the shardings of the state it is
given, so orbax reads each array straight into the current mesh's layout.

Mesh strings: comma-separated `name:size`; one size may be -1 ("the rest").
"" or None means `data:-1` (pure data parallel over every device). The
product of the sizes may be smaller than the device count (the first devices
are used), which is handy for benchmarks.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshSpec = Union[str, Mapping[str, int], None]


def parse_mesh(spec: MeshSpec, num_devices: Optional[int] = None
               ) -> Dict[str, int]:
  """'data:2,seq:4' | {'data': 2, 'seq': 4} | None -> ordered {name: size}.

  A size of -1 takes the remaining devices (`num_devices`, default all).
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  if spec is None or (isinstance(spec, str) and not spec.strip()):
    spec = {"data": -1}
  if isinstance(spec, str):
    axes = {}
    for part in spec.split(","):
      part = part.strip()
      name, sep, size = part.partition(":")
      name = name.strip()
      if not sep or not name or name in axes:
        raise ValueError(
            f"`mesh` must look like 'data:2,seq:4' (unique names), got {spec!r}.")
      try:
        axes[name] = int(size)
      except ValueError:
        raise ValueError(f"`mesh` axis {name!r} has a non-integer size "
                         f"{size!r} in {spec!r}.") from None
  else:
    axes = {str(k): int(v) for k, v in dict(spec).items()}
  if not axes:
    raise ValueError(f"`mesh` names no axes: {spec!r}.")
  wild = [n for n, s in axes.items() if s == -1]
  if len(wild) > 1 or any(s == 0 or s < -1 for s in axes.values()):
    raise ValueError(f"`mesh` sizes must be positive with at most one -1, got "
                     f"{axes}.")
  fixed = math.prod(s for s in axes.values() if s != -1)
  if wild:
    if num_devices % fixed:
      raise ValueError(f"`mesh` {axes}: {num_devices} devices are not "
                       f"divisible by the fixed sizes' product {fixed}.")
    axes[wild[0]] = num_devices // fixed
  if math.prod(axes.values()) > num_devices:
    raise ValueError(f"`mesh` {axes} needs {math.prod(axes.values())} "
                     f"devices, only {num_devices} available.")
  return axes


def make_mesh(spec: MeshSpec = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A `jax.sharding.Mesh` (Auto axes) from a mesh string or dict.

  Multi-host: call `maybe_initialize_distributed` first; `jax.devices()` then
  lists every process's devices and the mesh spans them all.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes = parse_mesh(spec, len(devices))
  n = math.prod(axes.values())
  if n < len(devices):
    logging.info("mesh %s uses %d of %d devices", axes, n, len(devices))
  arr = np.array(devices[:n], dtype=object).reshape(tuple(axes.values()))
  return Mesh(arr, tuple(axes.keys()))


def mesh_axis(mesh: Mesh, name: Optional[str]) -> Optional[str]:
  """`name` if it is an axis of `mesh` with size > 1, else None."""
  if name is None or name not in mesh.axis_names:
    return None
  return name if mesh.shape[name] > 1 else None


def maybe_initialize_distributed(coordinator_address: str = "",
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """`jax.distributed.initialize` when running multi-process; else a no-op.

  Initializes when a coordinator address is given (host:port, with
  num_processes/process_id) or when the environment announces a cluster
  (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, TPU pods: auto-detected by JAX).
  Returns True if it initialized.
  """
  import os
  cluster_env = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
  if not coordinator_address and not any(v in os.environ for v in cluster_env):
    return False
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def batch_spec(ndim: int, mesh: Mesh, *, data_axis: Optional[str] = "data",
               seq_axis: Optional[str] = None) -> PartitionSpec:
  """Batch dim over `data_axis`, dim 1 over `seq_axis` (when rank >= 2)."""
  data_axis = mesh_axis(mesh, data_axis)
  seq_axis = mesh_axis(mesh, seq_axis) if ndim >= 2 else None
  return PartitionSpec(*([data_axis, seq_axis][:max(ndim, 0)]))


def shard_batch(batch, mesh: Mesh, *, data_axis: Optional[str] = "data",
                seq_axis: Optional[str] = None):
  """Places a pytree of host arrays as global arrays sharded over the mesh.

  Leading (batch) dims go over `data_axis`, dim 1 over `seq_axis`; scalars
  are replicated. Single process: `batch` is the global batch. Multi-process:
  each process passes its own slice (global batch / process_count), assembled
  with `jax.make_array_from_process_local_data`.
  """
  multi = jax.process_count() > 1

  def put(x):
    x = np.asarray(x)
    spec = batch_spec(x.ndim, mesh, data_axis=data_axis, seq_axis=seq_axis)
    for dim, axis in enumerate(spec):
      if axis is not None:
        size = mesh.shape[axis] // (jax.process_count() if multi and dim == 0
                                    else 1)
        if x.shape[dim] % max(size, 1):
          raise ValueError(
              f"batch array of shape {x.shape}: dim {dim} is not divisible "
              f"by mesh axis {axis!r} of size {mesh.shape[axis]}.")
    sharding = NamedSharding(mesh, spec)
    if multi:
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map(put, batch)


def constrain_batch(batch, mesh: Mesh, *, data_axis: Optional[str] = "data",
                    seq_axis: Optional[str] = None):
  """Inside jit: `with_sharding_constraint` of a batch drawn on device.

  For loops that sample their batch inside the jitted step (from
  `fold_in(key, step)`): the constraint makes XLA shard the batch over
  `data_axis` (and dim 1 over `seq_axis`) instead of replicating it.
  """
  def one(x):
    spec = batch_spec(x.ndim, mesh, data_axis=data_axis, seq_axis=seq_axis)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return jax.tree_util.tree_map(one, batch)


def replicate(tree, mesh: Mesh):
  """`jax.device_put` of every array leaf, replicated over the whole mesh."""
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ----------------------------------------------------------------------------
# Parameters and optimizer state.
# ----------------------------------------------------------------------------


def param_spec(shape: Sequence[int], mesh: Mesh, *,
               fsdp_axis: Optional[str] = None,
               min_size: int = 2**14) -> PartitionSpec:
  """Replicated, or (FSDP) the largest divisible dim over `fsdp_axis`.

  Arrays with fewer than `min_size` elements stay replicated: sharding tiny
  biases and scales costs more in collectives than it saves in memory.
  """
  fsdp_axis = mesh_axis(mesh, fsdp_axis)
  shape = tuple(shape)
  if fsdp_axis is None or math.prod(shape) < min_size or not shape:
    return PartitionSpec()
  size = mesh.shape[fsdp_axis]
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % size == 0:
      spec = [None] * len(shape)
      spec[d] = fsdp_axis
      return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, *, fsdp_axis: Optional[str] = None,
                   min_size: int = 2**14):
  """NamedSharding per array leaf of `tree` (see `param_spec`)."""
  def one(x):
    shape = getattr(x, "shape", None)
    if shape is None:
      return None
    return NamedSharding(mesh, param_spec(shape, mesh, fsdp_axis=fsdp_axis,
                                          min_size=min_size))
  return jax.tree_util.tree_map(one, tree)


def shard_tree(tree, mesh: Mesh, *, fsdp_axis: Optional[str] = None,
               min_size: int = 2**14):
  """`jax.device_put` of every array leaf with `tree_shardings`."""
  shardings = tree_shardings(tree, mesh, fsdp_axis=fsdp_axis,
                             min_size=min_size)
  return jax.tree_util.tree_map(
      lambda x, s: x if s is None else jax.device_put(x, s), tree, shardings)


def shard_nnx(*modules, mesh: Mesh, fsdp_axis: Optional[str] = None,
              min_size: int = 2**14) -> None:
  """Moves the state of NNX modules/optimizers onto `mesh`, in place.

  Default: replicated (data parallel). With `fsdp_axis` (e.g. 'data'),
  parameters and the optimizer moments that mirror them are sharded over that
  axis (FSDP/ZeRO-3 style; XLA inserts the all-gathers and reduce-scatters).
  RNG keys and counters are replicated.
  """
  from flax import nnx
  for m in modules:
    state = nnx.state(m)
    nnx.update(m, shard_tree(state, mesh, fsdp_axis=fsdp_axis,
                             min_size=min_size))


def describe(tree) -> str:
  """One line per array leaf: path, shape, PartitionSpec (for logs)."""
  lines = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {spec}")
  return "\n".join(lines)


__all__ = ["batch_spec", "constrain_batch", "describe", "make_mesh",
           "maybe_initialize_distributed", "mesh_axis", "param_spec",
           "parse_mesh", "replicate", "shard_batch", "shard_nnx", "shard_tree",
           "tree_shardings"]


def make_training_mesh(mesh_spec: str, batch_sizes):
  """`make_mesh(mesh_spec)` for a training loop, checking batch sizes.

  `batch_sizes` maps config field names (e.g. "config.batch_size") to the
  training batch sizes that will be sharded over the mesh's `data` axis; a
  ValueError names the field and config.mesh when one is not divisible.
  """
  mesh = make_mesh(mesh_spec)
  data = mesh.shape["data"] if "data" in mesh.axis_names else 1
  for name, size in batch_sizes.items():
    if int(size) % data:
      raise ValueError(f"{name} ({size}) must be divisible by the 'data' "
                       f"axis size {data} of config.mesh {mesh_spec!r} "
                       f"(mesh {dict(mesh.shape)}).")
  return mesh
