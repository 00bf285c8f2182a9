"""Does XLA:CPU use both cores inside a lax.scan step? The per-tile work of
na_ceiling.py at 112^2 (256 tiles, B=1, 4 heads x 32): all at once, a scan
of 16 steps x 16 tiles, and the same scan whose step is two independent
8-tile halves (two separate op chains XLA may run concurrently). Wall and
process CPU time, round-robin in one process.

  python docs/benchmarks/cpu_perf/na_ceiling_par.py 5
"""
import sys

import jax
import jax.numpy as jnp

from experiments import bench_utils as bu
from na_ceiling import N, H, TQ, TK, work, scanned  # the same per-tile work

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5


def scanned_halves(q, k, v1):
  def body(c, xs):
    a = work(*(x[:8] for x in xs))
    b = work(*(x[8:] for x in xs))
    return c, jnp.concatenate([a, b])
  return jax.lax.scan(body, None, (q, k, v1))[1]


ks = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(ks[0], (256, N, TQ, H))
k = jax.random.normal(ks[1], (256, N, TK, H))
v = jax.random.normal(ks[2], (256, N, TK, H + 1))
st = lambda x: x.reshape(16, 16, *x.shape[1:])
calls = {"all": (work, (q, k, v)),
         "scan16x16": (scanned, (st(q), st(k), st(v))),
         "scan16x16_halves": (scanned_halves, (st(q), st(k), st(v)))}
load0 = bu.machine_load()["loadavg_1m"]
med, _, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
for name in calls:
  print(f"{name:18s} wall {med[name] * 1e3:8.2f} ms  cpu {cpu[name] * 1e3:8.2f} ms"
        f"  cores {cpu[name] / med[name]:.2f}")
print("load", load0, "->", bu.machine_load()["loadavg_1m"])
