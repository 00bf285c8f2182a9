"""Neighborhood 2D k=7: the per-tile work alone, and what a scan step costs.

ceiling/<g>: the per-tile work of g tiles at once, pre-arranged (batched
  Q K^T [g, 4, 49, 169], masked row max, exp, P V1 with a ones channel):
  16 / 64 / 256 tiles are 28^2 / 56^2 / 112^2 (B=1, 4 heads x 32).
scan/<g>x<s>: the same work as a lax.scan of s steps of g tiles each
  (xs pre-arranged per step: no gather, no dynamic slice in the body).
default/<size>, all_tiles/<size>: neighborhood_attention(q, k, v, 7) at
  <size>^2 (the default, and NeighborhoodXLA(row_loop=False)).
Forward only, process CPU and wall time, round-robin in one process.

  python docs/benchmarks/cpu_perf/na_ceiling.py 5
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_utils as bu

N, H, TQ, TK = 4, 32, 49, 169
mask = np.random.default_rng(0).random((TQ, TK)) < 0.3


def work(q, k, v1):
  s = jnp.einsum("gnqh,gnkh->gnqk", q, k) * 0.17
  m = jnp.max(jnp.where(mask, s, -1e30), axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(s - m), 0.0)
  ol = jnp.einsum("gnqk,gnkh->gnqh", e, v1)
  return ol[..., :-1] / ol[..., -1:]


def scanned(q, k, v1):
  def body(c, xs):
    return c, work(*xs)
  return jax.lax.scan(body, None, (q, k, v1))[1]


def main(reps):
  calls = {}
  for g in (16, 64, 256):
    ks = jax.random.split(jax.random.key(g), 3)
    q = jax.random.normal(ks[0], (g, N, TQ, H))
    k = jax.random.normal(ks[1], (g, N, TK, H))
    v = jax.random.normal(ks[2], (g, N, TK, H + 1))
    calls[f"ceiling/{g}"] = (work, (q, k, v))
    for step in (4, 16):
      if step < g:
        s = g // step
        calls[f"scan/{step}x{s}"] = (scanned, tuple(
            x.reshape(s, step, *x.shape[1:]) for x in (q, k, v)))
  from attnjax.spatial import neighborhood as na
  for size in (28, 56, 112):
    ks = jax.random.split(jax.random.key(size), 3)
    x = [jax.random.normal(kk, (1, size, size, N, H)) for kk in ks]
    calls[f"default/{size}"] = (
        lambda q, k, v: na.neighborhood_attention(q, k, v, 7), tuple(x))
    calls[f"all_tiles/{size}"] = (
        lambda q, k, v: na.neighborhood_attention(
            q, k, v, 7, implementation=na.NeighborhoodXLA(row_loop=False)),
        tuple(x))
  load0 = bu.machine_load()["loadavg_1m"]
  med, _, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
  for name in calls:
    print(f"{name:14s} wall {med[name] * 1e3:8.2f} ms  cpu {cpu[name] * 1e3:8.2f} ms")
  px = [784, 3136, 12544]
  for lab, names in (("ceiling", ["ceiling/16", "ceiling/64", "ceiling/256"]),
                     ("scan16", ["ceiling/16", "scan/16x4", "scan/16x16"]),
                     ("scan4", ["scan/4x4", "scan/4x16", "scan/4x64"]),
                     ("default", ["default/28", "default/56", "default/112"]),
                     ("all_tiles", ["all_tiles/28", "all_tiles/56",
                                    "all_tiles/112"])):
    print(lab, "exponent wall %.3f cpu %.3f" % (
        bu.loglog_slope(px, [med[n] for n in names]),
        bu.loglog_slope(px, [cpu[n] for n in names])))
  print("load", load0, "->", bu.machine_load()["loadavg_1m"])


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
