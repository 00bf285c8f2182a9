"""Gathered-block attention (block-sparse, routing, wide sliding
windows; MoBA keeps autodiff): the old
`attnjax/sequence/_gather.py` (autodiff through the loop) vs the current one
(custom VJP), interleaved in one process with the bench's calls (B=1, 4
heads, head_dim 64, float32): fwd and fwd+bwd, wall and process CPU
medians, exponent fits, compiled fwd+bwd temp memory.

usage: python docs/benchmarks/cpu_perf/gather_vjp_ab.py OLD_GATHER_PY S1,S2,..
(OLD_GATHER_PY: e.g. `git show 12cec36:attnjax/sequence/_gather.py > /tmp/old_gather.py`)
"""
import importlib.util
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import sequence as sq
from attnjax.sequence import moba, routing, sparse
from experiments.bench_sections.sequence import _band_layout

spec = importlib.util.spec_from_file_location("old_gather", sys.argv[1])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
NEW = sparse.gathered_attention
MODS = (sparse, moba, routing)
CALLS = {
    "block_sparse": lambda q, k, v: sq.block_sparse_attention(
        q, k, v, _band_layout(q.shape[1]), 128, is_causal=True),
    "sliding_w700": lambda q, k, v: sq.sliding_window_attention(
        q, k, v, window_size=700, block_size=128),
    "routing": lambda q, k, v: sq.routing_attention(q, k, v, region_size=256,
                                                    top_k=4),
}


def use(fn):
  for m in MODS:
    m.gathered_attention = fn


def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


res = {}
for s in [int(x) for x in sys.argv[2].split(",")]:
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (1, s, 4, 64)) for kk in ks[:3])
  ct = jax.random.normal(ks[3], (1, s, 4, 64))
  fns, mem = {}, {}
  for mech, call in CALLS.items():
    for name, g in (("old", old.gathered_attention), ("new", NEW)):
      use(g)
      fns[(mech, name, "fwd")] = jax.jit(call).lower(q, k, v).compile()
      c = jax.jit(lambda q, k, v, f=call: jax.vjp(f, q, k, v)[1](ct)).lower(
          q, k, v).compile()
      fns[(mech, name, "fb")] = c
      mem[(mech, name)] = c.memory_analysis().temp_size_in_bytes / 2**20
    use(NEW)
    g1, g2 = fns[(mech, "old", "fb")](q, k, v), fns[(mech, "new", "fb")](q, k, v)
    err = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
              for a, b in zip(g1, g2))
    print(f"S={s} {mech}: grad max rel diff old/new {err:.1e}; fwd+bwd temp "
          f"MiB old {mem[(mech, 'old')]:.0f} new {mem[(mech, 'new')]:.0f}",
          flush=True)
  times = {key: [] for key in fns}
  load0 = os.getloadavg()[0]
  for rep in range(3):
    for key, f in fns.items():
      c0, w0 = cpu(), time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times[key].append((time.perf_counter() - w0, cpu() - c0))
  med = {key: tuple(np.median([t[i] for t in ts]) * 1e3 for i in (0, 1))
         for key, ts in times.items()}
  res[s] = med
  for mech in CALLS:
    m = lambda n, md: med[(mech, n, md)]
    print(f"S={s} {mech} load {load0:.1f}->{os.getloadavg()[0]:.1f}: "
          f"fwd old {m('old','fwd')[0]:.1f}/{m('old','fwd')[1]:.1f} new "
          f"{m('new','fwd')[0]:.1f}/{m('new','fwd')[1]:.1f}; fwd+bwd old "
          f"{m('old','fb')[0]:.1f}/{m('old','fb')[1]:.1f} new "
          f"{m('new','fb')[0]:.1f}/{m('new','fb')[1]:.1f} ms wall/CPU; "
          f"new/old fwd+bwd CPU {m('new','fb')[1] / m('old','fb')[1]:.2f}",
          flush=True)
ss = sorted(res)
if len(ss) > 1:
  for key in res[ss[0]]:
    fit = [np.polyfit(np.log(ss), np.log([res[x][key][i] for x in ss]), 1)[0]
           for i in (0, 1)]
    print(f"exponent {key}: wall {fit[0]:.3f} CPU {fit[1]:.3f}")
