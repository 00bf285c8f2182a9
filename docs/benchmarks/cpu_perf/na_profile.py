import sys, jax, jax.numpy as jnp, numpy as np
from experiments import bench_utils as bu
from attnjax import spatial as sp
sizes = [int(x) for x in sys.argv[1].split(",")]
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
for s in sizes:
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, s, s, 4, 32)) for x in ks)
  fn = lambda q, k, v: sp.neighborhood_attention(q, k, v, 7)
  calls = {"fwd": (fn, (q, k, v)), "fwd_bwd": (bu.fwd_bwd(fn), (q, k, v)),
           "copy3": (lambda q, k, v: (q * 2, k * 2, v * 2), (q, k, v))}
  med, _, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
  print(s, s * s, {n: round(t * 1e3, 2) for n, t in med.items()}, "cpu",
        {n: round(t * 1e3, 2) for n, t in cpu.items()},
        "per px us fwd %.3f fb %.3f" % (med["fwd"] / s / s * 1e6, med["fwd_bwd"] / s / s * 1e6), flush=True)
