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
  procs = {d.process_index for d in devices}
  left_out = procs - {d.process_index for d in devices[:n]}
  if left_out:
    raise ValueError(
        f"`mesh` {spec!r} ({axes}) uses {n} of the {len(devices)} devices of "
        f"this {len(procs)}-process run and none of processes "
        f"{sorted(left_out)}: every process must hold part of the mesh. "
        "Use e.g. 'data:-1' (all devices).")
  arr = np.array(devices[:n], dtype=object).reshape(tuple(axes.values()))
  return Mesh(arr, tuple(axes.keys()))


def mesh_axis(mesh: Mesh, name: Optional[str]) -> Optional[str]:
  """`name` if it is an axis of `mesh` with size > 1, else None."""
  if name is None or name not in mesh.axis_names:
    return None
  return name if mesh.shape[name] > 1 else None


# Environment of a multi-process run. JAX itself reads JAX_COORDINATOR_ADDRESS
# (and detects SLURM, Open MPI, Kubernetes and Cloud TPU clusters); the
# process count and index have no JAX variable, so the launcher
# (experiments/launch.py) and users on a plain cluster set these two.
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
# Bounded waits (seconds): connecting to the coordinator, and how long a
# process may miss heartbeats before the others declare it dead and exit.
ENV_INIT_TIMEOUT = "ATTNJAX_DIST_INIT_TIMEOUT_S"
ENV_HEARTBEAT_TIMEOUT = "ATTNJAX_DIST_HEARTBEAT_TIMEOUT_S"
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> Optional[int]:
  import os
  v = os.environ.get(name, "").strip()
  if not v:
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r} is not an "
                     "integer.") from None


def maybe_initialize_distributed(coordinator_address: str = "",
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None, *,
                                 initialization_timeout: Optional[int] = None,
                                 heartbeat_timeout: Optional[int] = None
                                 ) -> bool:
  """`jax.distributed.initialize` when running multi-process; else a no-op.

  Initializes when a coordinator address is given (host:port) or the
  environment announces a cluster: JAX_COORDINATOR_ADDRESS (with
  JAX_NUM_PROCESSES / JAX_PROCESS_ID, as set by `python -m
  experiments.launch`), or SLURM, Open MPI, Kubernetes and TPU pod variables,
  which JAX's own cluster detection reads. Idempotent: returns False when
  jax.distributed is already initialized or nothing asks for it, True when
  this call initialized it. Must run before any JAX computation.

  Timeouts (seconds; defaults from ATTNJAX_DIST_INIT_TIMEOUT_S and
  ATTNJAX_DIST_HEARTBEAT_TIMEOUT_S, else JAX's 300 / 100): a process that
  cannot reach the coordinator fails after `initialization_timeout`; when a
  peer dies, the survivors are terminated by JAX's coordination service
  within about `heartbeat_timeout` instead of waiting in a collective
  forever.
  """
  import os
  if jax.distributed.is_initialized():
    return False
  coordinator_address = (coordinator_address or
                         os.environ.get("JAX_COORDINATOR_ADDRESS", ""))
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if not coordinator_address and not any(v in os.environ
                                         for v in _CLUSTER_ENV):
    return False
  if num_processes == 1 and coordinator_address:
    return False    # a one-process "cluster": nothing to coordinate
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = num_processes
  if process_id is not None:
    kwargs["process_id"] = process_id
  init_t = (initialization_timeout if initialization_timeout is not None
            else _env_int(ENV_INIT_TIMEOUT))
  beat_t = (heartbeat_timeout if heartbeat_timeout is not None
            else _env_int(ENV_HEARTBEAT_TIMEOUT))
  if init_t is not None:
    kwargs["initialization_timeout"] = int(init_t)
  if beat_t is not None:
    kwargs["heartbeat_timeout_seconds"] = int(beat_t)
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that writes results, figures and logs)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)`; no-op on one."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def batch_spec(ndim: int, mesh: Mesh, *, data_axis: Optional[str] = "data",
               seq_axis: Optional[str] = None) -> PartitionSpec:
  """Batch dim over `data_axis`, dim 1 over `seq_axis` (when rank >= 2)."""
  data_axis = mesh_axis(mesh, data_axis)
  seq_axis = mesh_axis(mesh, seq_axis) if ndim >= 2 else None
  return PartitionSpec(*([data_axis, seq_axis][:max(ndim, 0)]))


def process_slice(global_shape: Sequence[int], mesh: Mesh, *,
                  data_axis: Optional[str] = "data",
                  seq_axis: Optional[str] = None) -> tuple:
  """The part of a global batch that this process loads (per-process data).

  Returns a tuple of slices, one per dim of `global_shape`: the block of the
  global batch held by this process's devices under `batch_spec`. A data
  pipeline reads only `global_batch[process_slice(...)]` and hands it to
  `shard_batch` (single process: the whole batch).
  """
  spec = batch_spec(len(global_shape), mesh, data_axis=data_axis,
                    seq_axis=seq_axis)
  idx = NamedSharding(mesh, spec).addressable_devices_indices_map(
      tuple(global_shape))
  out = []
  for d, n in enumerate(global_shape):
    sl = [ix[d] for ix in idx.values()]
    lo = min(s.start or 0 for s in sl)
    hi = max(n if s.stop is None else s.stop for s in sl)
    out.append(slice(lo, hi))
  return tuple(out)


def shard_batch(batch, mesh: Mesh, *, data_axis: Optional[str] = "data",
                seq_axis: Optional[str] = None):
  """Places a pytree of host arrays as global arrays sharded over the mesh.

  Leading (batch) dims go over `data_axis`, dim 1 over `seq_axis`; scalars
  are replicated. Single process: `batch` is the global batch. Multi-process:
  each process passes its own part, `global_batch[process_slice(...)]`
  (with the batch over processes: global batch / process count rows),
  assembled with `jax.make_array_from_process_local_data`.
  """
  multi = jax.process_count() > 1
  local = mesh.local_mesh if multi else mesh

  def put(x):
    x = np.asarray(x)
    spec = batch_spec(x.ndim, mesh, data_axis=data_axis, seq_axis=seq_axis)
    for dim, axis in enumerate(spec):
      if axis is not None:
        size = local.shape[axis]
        if x.shape[dim] % max(size, 1):
          raise ValueError(
              f"batch array of shape {x.shape}: dim {dim} is not divisible "
              f"by mesh axis {axis!r} of size {size} "
              f"({'on this process' if multi else 'mesh'} "
              f"{dict(local.shape)}).")
    sharding = NamedSharding(mesh, spec)
    if multi:
      return jax.make_array_from_process_local_data(sharding, x)
    return jax.device_put(x, sharding)

  return jax.tree_util.tree_map(put, batch)


def global_batch(batch, mesh: Mesh, *, data_axis: Optional[str] = "data",
                 seq_axis: Optional[str] = None):
  """Like `shard_batch`, from the *global* batch present in every process.

  Each process keeps only its `process_slice`; the result is the same
  global array on one process or many (for tests and small in-memory
  datasets).
  """
  def one(x):
    x = np.asarray(x)
    sl = process_slice(x.shape, mesh, data_axis=data_axis, seq_axis=seq_axis)
    return shard_batch(x[sl], mesh, data_axis=data_axis, seq_axis=seq_axis)
  return jax.tree_util.tree_map(one, batch)


def fetch(tree):
  """Global arrays -> NumPy on every process (all-gathers what is remote)."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


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


def put(x, sharding: NamedSharding):
  """`jax.device_put(x, sharding)`, also onto devices of other processes.

  Multi-process, `device_put` cannot move a host value or a process-local
  array onto a sharding that spans other processes' devices; then every
  process contributes its addressable shards of `x` (which must be the same
  value on every process, e.g. parameters initialised from one seed) with
  `jax.make_array_from_callback`. Typed PRNG keys go through their key data.
  """
  if (jax.process_count() == 1 or sharding.is_fully_addressable or
      (isinstance(x, jax.Array) and not x.is_fully_addressable)):
    return jax.device_put(x, sharding)
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(x)
    spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
    data = put(data, NamedSharding(sharding.mesh, PartitionSpec(*spec)))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
  """`jax.device_put` of every array leaf, replicated over the whole mesh."""
  rep = NamedSharding(mesh, PartitionSpec())
  return jax.tree_util.tree_map(lambda x: put(x, rep), tree)


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
      lambda x, s: x if s is None else put(x, s), tree, shardings)


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


__all__ = ["barrier", "batch_spec", "constrain_batch", "describe", "fetch",
           "global_batch", "is_main_process", "make_mesh",
           "make_training_mesh", "maybe_initialize_distributed", "mesh_axis",
           "mesh_from_config",
           "param_spec", "parse_mesh", "process_slice", "put", "replicate",
           "shard_batch", "shard_nnx", "shard_tree", "tree_shardings"]


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


def mesh_from_config(*batch_fields: str):
  """A study's `make_mesh(cfg)`: `make_training_mesh(cfg.mesh, ...)` checking
  the batch sizes at the dotted config paths `batch_fields` (e.g.
  "batch_size", "recall.batch_size") against the mesh's `data` axis."""
  def make(cfg):
    sizes = {}
    for path in batch_fields:
      value = cfg
      for part in path.split("."):
        value = value[part]
      sizes[f"config.{path}"] = value
    return make_training_mesh(cfg.mesh, sizes)
  make.__doc__ = (f"The training mesh from `cfg.mesh`, checking "
                  f"{', '.join('config.' + f for f in batch_fields)} against "
                  f"its `data` axis.")
  return make
