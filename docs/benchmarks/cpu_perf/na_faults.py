"""Neighborhood 2D k=7 (B=1, 4 heads x 32): user and system CPU time and
minor page faults per call (10 calls after a warm-up, getrusage), at
28, 56, 112 pixels per side, fwd and fwd_bwd (issue 22 item 3).
  python docs/benchmarks/cpu_perf/na_faults.py [loop|default]
  (no argument: the all-tiles path, row_loop=False; loop: row_loop=True;
  default: implementation=None, the size-selected default)
"""
import resource, time, jax, jax.numpy as jnp, sys
sys.path.insert(0,'.')
from attnjax.spatial import neighborhood as na
from experiments import bench_utils as bu
for s in (28, 56, 112):
  q=jax.random.normal(jax.random.key(0),(1,s,s,4,32))
  for mode in ("fwd","fwd_bwd"):
    arg=sys.argv[1] if len(sys.argv) > 1 else ""
    cfg=None if arg=="default" else na.NeighborhoodXLA(row_loop=(arg == "loop"))
    f0=lambda q,k,v: na.neighborhood_attention(q,k,v,7,implementation=cfg)
    f=jax.jit(bu.fwd_bwd(f0) if mode=="fwd_bwd" else f0)
    jax.block_until_ready(f(q,q,q))
    r0=resource.getrusage(resource.RUSAGE_SELF); t0=time.perf_counter()
    n=10
    for _ in range(n): jax.block_until_ready(f(q,q,q))
    r1=resource.getrusage(resource.RUSAGE_SELF); t1=time.perf_counter()
    print(s, mode, "wall %.1f ms user %.1f sys %.1f minflt %d per call" % ((t1-t0)/n*1e3, (r1.ru_utime-r0.ru_utime)/n*1e3, (r1.ru_stime-r0.ru_stime)/n*1e3, (r1.ru_minflt-r0.ru_minflt)/n), flush=True)
