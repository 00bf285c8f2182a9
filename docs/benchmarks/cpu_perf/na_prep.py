"""Neighborhood k=7 at 112x112 (B=1, 4 heads x 32): the default forward vs the
same call with the band loop replaced by a stub (what is spent outside the
loop: tiling q, padding k/v, the output back), and a bare q transpose.

  python docs/benchmarks/cpu_perf/na_prep.py
"""
import jax, jax.numpy as jnp, numpy as np
from attnjax.spatial import neighborhood as na
from experiments import bench_utils as bu
s=112
ks = jax.random.split(jax.random.key(0), 3)
q, k, v = (jax.random.normal(x, (1, s, s, 4, 32)) for x in ks)
captured = {}
orig = na._band_core
def fake_core(geo, qt, kp, vp, rpb):
  # no attention: outputs of the right shapes from the prepared inputs
  out = qt[..., :1].sum() + kp[..., :1].sum() + vp[..., :1].sum()
  o = jnp.broadcast_to(out, qt.shape[:-1] + (32,)).astype(qt.dtype)
  return o, o[..., 0]
full = jax.jit(lambda q, k, v: na.neighborhood_attention(q, k, v, 7))
full(q, k, v)
na._band_core = fake_core
prep = jax.jit(lambda q, k, v: na.neighborhood_attention(q, k, v, 7))
prep(q, k, v)
na._band_core = orig
def tile_only(q, k, v):
  return q.reshape(16, 7, 16, 7, 4, 32).transpose(0, 2, 4, 1, 3, 5) * 1.0
calls = {"full": (full, (q, k, v)), "prep+untile": (prep, (q, k, v)), "q transpose only": (jax.jit(tile_only), (q, k, v))}
med, _, cpu = bu.interleaved_times(calls, repeats=7, cpu=True)
print({n: f"{med[n]*1e3:.1f} ({cpu[n]*1e3:.1f})" for n in calls}, bu.machine_load()["loadavg_1m"])
