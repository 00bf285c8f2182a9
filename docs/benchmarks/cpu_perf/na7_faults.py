"""Neighborhood 2D (B=1, 4 heads x 32), k=7 / dilation 2 / stride 4: user and
system CPU ms and minor page faults per call (getrusage over 10 calls after a
warm-up) of a copy of the module (path argument; default the working tree).

  python docs/benchmarks/cpu_perf/na7_faults.py [module.py] [sizes]
"""
import importlib.util
import resource
import sys
import time

import jax

from experiments import bench_utils as bu

path = sys.argv[1] if len(sys.argv) > 1 else "attnjax/spatial/neighborhood.py"
sizes = [int(s) for s in (sys.argv[2] if len(sys.argv) > 2 else "112").split(",")]
spec = importlib.util.spec_from_file_location("na_mod", path)
na = importlib.util.module_from_spec(spec)
sys.modules["na_mod"] = na
src = open(path).read().replace('Op("neighborhood_attention', 'Op("na7f_')
exec(compile(src, path, "exec"), na.__dict__)
for s in sizes:
  q = jax.random.normal(jax.random.key(0), (1, s, s, 4, 32))
  for name, kw in (("k7", {}), ("d2", {"dilation": 2}), ("s4", {"stride": 4})):
    for mode in ("fwd", "fwd_bwd"):
      f0 = lambda q, k, v: na.neighborhood_attention(q, k, v, 7, **kw)
      f = jax.jit(bu.fwd_bwd(f0) if mode == "fwd_bwd" else f0)
      jax.block_until_ready(f(q, q, q))
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      t0 = time.perf_counter()
      n = 10
      for _ in range(n):
        jax.block_until_ready(f(q, q, q))
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      t1 = time.perf_counter()
      print(path.split("/")[-1], s, name, mode,
            "wall %.1f ms user %.1f sys %.1f minflt %d per call" % (
                (t1 - t0) / n * 1e3, (r1.ru_utime - r0.ru_utime) / n * 1e3,
                (r1.ru_stime - r0.ru_stime) / n * 1e3,
                (r1.ru_minflt - r0.ru_minflt) / n),
            bu.machine_load()["loadavg_1m"], flush=True)
