r"""Sequence-parallel attention benchmark: per-device memory and time vs P.

Fixed total problem (batch, sequence length T, heads, head_dim); the sequence
is sharded over P = 1, 2, 4, 8 devices and each method is compiled for that
mesh. For every (P, method, mode) row it reports

  mem/dev   XLA's compiled memory analysis of the SPMD program, i.e. what ONE
            device allocates (its argument shards + outputs + temporaries);
  time      median wall time per call after compilation;
  comm/dev  bytes each device sends per call, from the cost model in
            docs/distributed.md (not measured).

Methods: 'dense' (attnjax.dot_product_attention under jit on sequence-
sharded inputs: GSPMD decides the communication; at P=1 it is the
single-device baseline), 'ring' (non-causal), 'ring_zigzag' /
'ring_striped' / 'ring_contiguous' (causal ring, three placements),
'ulysses' / 'ulysses_causal'.

On CPU the P devices are forced host devices
(--xla_force_host_platform_device_count, set from --host_devices before jax
starts) that share the machine's cores, so time measures total work plus
collective overhead, not parallel speed-up; memory per device is exact.

Run:
  python -m experiments.bench_distributed --workdir=runs/bench_distributed
  python -m experiments.bench_distributed --workdir=/tmp/bd --quick   # smoke

Writes DIR/results.json ({"config": ..., "rows": [...]}) and prints a table.
"""

from __future__ import annotations

import os
import sys


def _force_host_devices(argv) -> None:
  """Sets XLA_FLAGS before jax initializes (a no-op once jax is imported)."""
  n = 8
  for a in argv:
    if a.startswith("--host_devices="):
      n = int(a.split("=", 1)[1])
  if "jax" in sys.modules or n <= 0:
    return
  flags_ = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags_:
    os.environ["XLA_FLAGS"] = (
        flags_ + f" --xla_force_host_platform_device_count={n}").strip()


_force_host_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import attnjax
from attnjax.distributed import ring_attention, ulysses_attention
from experiments import bench_utils, common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_distributed", "Output directory.")
flags.DEFINE_integer("host_devices", 8,
                     "Forced host devices on CPU (read before jax starts).")
flags.DEFINE_string("devices", "1,2,4,8", "Device counts P to sweep.")
flags.DEFINE_string("methods",
                    "dense,ring,ring_zigzag,ring_striped,ring_contiguous,"
                    "ulysses,ulysses_causal", "Comma-separated methods.")
flags.DEFINE_string("modes", "fwd,fwd_bwd", "fwd and/or fwd_bwd.")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("seq_len", 2048, "Total sequence length T (fixed).")
flags.DEFINE_integer("heads", 8, "Query heads N (also kv heads).")
flags.DEFINE_integer("head_dim", 64, "Head dim H.")
flags.DEFINE_string("dtype", "float32", "float32 or bfloat16.")
flags.DEFINE_integer("repeats", 3, "Timed calls per row (median).")
flags.DEFINE_bool("quick", False, "T=256, 2 repeats (smoke test).")

CAUSAL = {"dense": False, "ring": False, "ring_zigzag": True,
          "ring_striped": True, "ring_contiguous": True, "ulysses": False,
          "ulysses_causal": True}


def comm_bytes_per_device(method, p, b, t, n, k, h, itemsize, mode):
  """Bytes one device sends per call (cost model of docs/distributed.md)."""
  if p == 1:
    return 0
  shard = b * (t // p) * h * itemsize            # one head of one shard
  if method.startswith("ring"):
    fwd = (p - 1) * 2 * k * shard                 # k and v, P-1 hops
    bwd = p * 4 * k * shard                       # k, v, dk, dv, P hops
    return fwd + (bwd if mode == "fwd_bwd" else 0)
  if method.startswith("ulysses"):
    frac = (p - 1) / p                            # all_to_all keeps 1/P
    fwd = frac * (2 * n + 2 * k) * shard          # q, k, v in; out back
    return int(fwd * (2 if mode == "fwd_bwd" else 1))
  return -1  # 'dense': chosen by GSPMD, not modelled


def make_fn(method, mesh):
  causal = CAUSAL[method]
  if method == "dense":
    return lambda q, k, v: attnjax.dot_product_attention(
        q, k, v, is_causal=causal, implementation="xla")
  if method.startswith("ring"):
    layout = method.split("_", 1)[1] if "_" in method else "zigzag"
    return lambda q, k, v: ring_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=causal, layout=layout,
        permuted=True)
  if method.startswith("ulysses"):
    return lambda q, k, v: ulysses_attention(
        q, k, v, mesh=mesh, axis_name="seq", is_causal=causal,
        implementation="xla")
  raise ValueError(f"unknown method {method!r}; choose from {sorted(CAUSAL)}")


def run_row(method, mode, p, arrays, mesh):
  fn = make_fn(method, mesh)
  if mode == "fwd_bwd":
    fn = bench_utils.fwd_bwd(fn)
  elif mode != "fwd":
    raise ValueError(f"unknown mode {mode!r}")
  jfn = jax.jit(fn)
  mem = bench_utils.peak_memory_bytes(jfn, *arrays)
  sec = bench_utils.time_fn(jfn, *arrays, repeats=FLAGS.repeats)
  return mem, sec


MODES = ("fwd", "fwd_bwd")


def _choices(flag: str, value: str, allowed) -> list:
  """The comma-separated items of `value`; a UsageError lists `allowed`."""
  items = [m.strip() for m in value.split(",") if m.strip()]
  bad = [m for m in items if m not in allowed]
  if bad or not items:
    raise app.UsageError(
        f"{flag}: unknown {', '.join(map(repr, bad)) or '(none given)'}; "
        f"choose from {','.join(allowed)}.")
  return items


def parse_args(methods: str, modes: str, devices: str, seq_len: int,
               num_devices: int):
  """Checks --methods/--modes/--devices; a UsageError lists the choices."""
  ms = _choices("--methods", methods, CAUSAL)
  md = _choices("--modes", modes, MODES)
  try:
    counts = [int(x) for x in devices.split(",") if x.strip()]
  except ValueError:
    raise app.UsageError(f"--devices={devices!r}: comma-separated integers "
                         "expected, e.g. 1,2,4,8.") from None
  ok = [p for p in range(1, num_devices + 1) if seq_len % p == 0]
  bad = [p for p in counts if p < 1 or seq_len % p]
  if bad or not counts:
    raise app.UsageError(
        f"--devices: {', '.join(map(str, bad)) or '(none given)'} cannot "
        f"shard the sequence (--seq_len={seq_len} must be divisible by each "
        f"device count); with {num_devices} devices choose from "
        f"{','.join(map(str, ok))}.")
  return ms, md, counts


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.seq_len, FLAGS.repeats = 256, 2
  b, t, n, h = FLAGS.batch, FLAGS.seq_len, FLAGS.heads, FLAGS.head_dim
  dtype = jnp.dtype(FLAGS.dtype)
  available = jax.devices()
  methods, modes, counts = parse_args(FLAGS.methods, FLAGS.modes,
                                      FLAGS.devices, t, len(available))
  ks = jax.random.split(jax.random.key(0), 3)
  host = [np.asarray(jax.random.normal(kk, (b, t, n, h), dtype)) for kk in ks]
  rows = []
  header = (f"{'P':>2} {'method':<16} {'mode':<8} {'mem/dev MB':>11} "
            f"{'time ms':>9} {'comm/dev MB':>12}")
  print(f"T={t} B={b} N={n} H={h} {dtype.name} on {available[0].platform} "
        f"({len(available)} devices)")
  print(header)
  print("-" * len(header))
  for p in counts:
    if p > len(available):
      logging.warning("skipping P=%d: only %d devices", p, len(available))
      continue
    mesh = Mesh(np.array(available[:p]), ("seq",))
    sharding = NamedSharding(mesh, PartitionSpec(None, "seq"))
    arrays = [jax.device_put(x, sharding) for x in host]
    for method in methods:
      if method.startswith("ulysses") and n % p:
        continue
      if method == "ring_zigzag" and t % (2 * p):
        continue
      measured = {mode: run_row(method, mode, p, arrays, mesh)
                  for mode in modes}
      noisy = False
      if "fwd" in measured and "fwd_bwd" in measured:
        # fwd+bwd includes the forward: timed no slower than it, the
        # difference is below the noise floor; re-time, then flag.
        first = [(measured["fwd"][1], measured["fwd_bwd"][1])]

        def measure(method=method, first=first, mesh=mesh, arrays=arrays,
                    p=p):
          if first:
            return first.pop()
          return (run_row(method, "fwd", p, arrays, mesh)[1],
                  run_row(method, "fwd_bwd", p, arrays, mesh)[1])

        tf, tb, noisy = common.ordered_timings(measure)
        measured["fwd"] = (measured["fwd"][0], tf)
        measured["fwd_bwd"] = (measured["fwd_bwd"][0], tb)
      for mode in modes:
        mem, sec = measured[mode]
        comm = comm_bytes_per_device(method, p, b, t, n, n, h,
                                     dtype.itemsize, mode)
        row = dict(devices=p, method=method, mode=mode,
                   causal=CAUSAL[method], mem_per_device_bytes=mem,
                   time_s=sec, comm_per_device_bytes=comm,
                   below_noise_floor=bool(noisy and mode == "fwd_bwd"))
        rows.append(row)
        comm_s = f"{comm / 2**20:12.2f}" if comm >= 0 else f"{'gspmd':>12}"
        note = ("  below noise floor: fwd+bwd timed <= fwd; raise --repeats"
                if row["below_noise_floor"] else "")
        print(f"{p:>2} {method:<16} {mode:<8} {mem / 2**20:11.2f} "
              f"{sec * 1e3:9.2f} {comm_s}{note}", flush=True)
  config = dict(batch=b, seq_len=t, heads=n, head_dim=h, dtype=dtype.name,
                platform=available[0].platform, repeats=FLAGS.repeats,
                jax_version=jax.__version__)
  path = common.write_results(FLAGS.workdir, {"config": config, "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
