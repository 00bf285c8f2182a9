"""Causal 'xla' before/after vs jax.nn in one process (issue 22 item 4).

old = attnjax/softmax/xla.py's attention_probs before the jax.nn.softmax
form (a copy at runs/p22/old_xla.py, `git show <commit>:attnjax/softmax/
xla.py`), patched in while the old variant is traced; new = working tree.
B=1, 8 heads, head_dim 64, float32, causal; calls timed round-robin.

  python docs/benchmarks/cpu_perf/xla_causal_ab.py 2048,4096 5
"""
import functools
import importlib.util
import sys

import jax
import jax.numpy as jnp

import attnjax
from attnjax.softmax import xla as xla_mod
from experiments import bench_utils as bu

spec = importlib.util.spec_from_file_location("old_xla", "runs/p22/old_xla.py")
old_mod = importlib.util.module_from_spec(spec)
sys.modules["old_xla"] = old_mod
spec.loader.exec_module(old_mod)

new_fn = functools.partial(attnjax.dot_product_attention, is_causal=True,
                           implementation="xla")


def old_fn(q, k, v):
  saved = xla_mod.attention_probs
  xla_mod.attention_probs = old_mod.attention_probs
  try:
    return new_fn(q, k, v)
  finally:
    xla_mod.attention_probs = saved


fns = {"jax.nn": functools.partial(jax.nn.dot_product_attention,
                                   is_causal=True, implementation="xla"),
       "old": old_fn, "new": new_fn}
print("load", bu.machine_load())
for s in [int(x) for x in sys.argv[1].split(",")]:
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, s, 8, 64), jnp.float32) for x in ks)
  calls = {}
  for name, f in fns.items():
    calls[(name, "fwd")] = (f, (q, k, v))
    calls[(name, "fwd_bwd")] = (bu.fwd_bwd(f), (q, k, v))
  med, _, cpu = bu.interleaved_times(calls, repeats=int(sys.argv[2]), cpu=True)
  for m in ("fwd", "fwd_bwd"):
    print(f"S={s} {m}: " + ", ".join(
        f"{n} {med[(n, m)] * 1e3:.0f} ms (cpu {cpu[(n, m)] * 1e3:.0f})"
        for n in fns) + "; / jax.nn wall, cpu: " + ", ".join(
        f"{n} {med[(n, m)] / med[('jax.nn', m)]:.2f}, "
        f"{cpu[(n, m)] / cpu[('jax.nn', m)]:.2f}" for n in ("old", "new")),
          flush=True)
print("load", bu.machine_load())
