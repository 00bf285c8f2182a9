"""Compiled temp memory of neighborhood k=7 at 112x112 (B=1, 4 heads x 32):
the default vs NeighborhoodXLA(row_loop=False), plain / dilation 2 / stride
4, forward and forward+backward.

  python docs/benchmarks/cpu_perf/na_temp.py
"""
import jax, jax.numpy as jnp
from attnjax.spatial import neighborhood as na
from experiments import bench_utils as bu
x = jax.ShapeDtypeStruct((1, 112, 112, 4, 32), jnp.float32)
for name, cfg in (("default", None), ("all_tiles", na.NeighborhoodXLA(row_loop=False))):
  for kw in ({}, dict(dilation=2), dict(stride=4)):
    f = lambda q, k, v: na.neighborhood_attention(q, k, v, 7, implementation=cfg, **kw)
    for mode, fn in (("fwd", f), ("fwd_bwd", bu.fwd_bwd(f))):
      m = jax.jit(fn).lower(x, x, x).compile().memory_analysis()
      print(name, kw, mode, "temp %.1f MiB" % (m.temp_size_in_bytes / 2**20), flush=True)
