"""Neighborhood 2D k=7 before/after in one process (issue 22 item 3).

old = attnjax/spatial/neighborhood.py before the row loop (a copy at
runs/p22/old_neighborhood.py, made with `git show <commit>:attnjax/spatial/
neighborhood.py`, its Op renamed "neighborhood_attention_old" so both can register), new = the working tree; extra variants of the new code by
NeighborhoodXLA settings. B=1, 4 heads, head_dim 32 (the spatial section's
inputs), float32; every call of one size timed round-robin, wall and process
CPU time; exponent fits of time vs pixels over the sizes given.

  python docs/benchmarks/cpu_perf/na_ab.py 28,56,112 5 [old,new,...] [out.json]

(NA_OLD=<path> loads "old" from another copy; new_s<KiB>: the default path
with NeighborhoodXLA(step_bytes=<KiB> * 1024).)
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp

from attnjax.spatial import neighborhood as new_na
from experiments import bench_utils as bu


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  m = importlib.util.module_from_spec(spec)
  sys.modules[name] = m
  spec.loader.exec_module(m)
  return m


sizes = [int(x) for x in sys.argv[1].split(",")]
reps = int(sys.argv[2])
which = (sys.argv[3] if len(sys.argv) > 3 else "old,new").split(",")
path = sys.argv[4] if len(sys.argv) > 4 else "runs/p22/na_ab.json"
fns = {}
# NA_KW: extra window arguments for every variant, e.g. NA_KW='dilation=2'
KW = eval(f"dict({os.environ.get('NA_KW', '')})")
if "old" in which:
  old_na = _load("old_neighborhood", os.environ.get(
      "NA_OLD", "runs/p22/old_neighborhood.py"))
  fns["old"] = lambda q, k, v: old_na.neighborhood_attention(q, k, v, 7, **KW)
if "new" in which:
  fns["new"] = lambda q, k, v: new_na.neighborhood_attention(q, k, v, 7, **KW)
if "new_loop" in which:
  cfg_l = new_na.NeighborhoodXLA(row_loop=True)
  fns["new_loop"] = lambda q, k, v: new_na.neighborhood_attention(
      q, k, v, 7, **KW, implementation=cfg_l)
if "new_noloop" in which:
  cfg = new_na.NeighborhoodXLA(row_loop=False)
  fns["new_noloop"] = lambda q, k, v: new_na.neighborhood_attention(
      q, k, v, 7, **KW, implementation=cfg)
for w in which:
  if w.startswith("new_s"):   # NeighborhoodXLA(step_bytes=<KiB> * 1024)
    cfg = new_na.NeighborhoodXLA(step_bytes=int(w[5:]) * 1024)
    fns[w] = (lambda c: lambda q, k, v: new_na.neighborhood_attention(
        q, k, v, 7, **KW, implementation=c))(cfg)
  if w.startswith("new_t"):
    cfg = new_na.NeighborhoodXLA(tile_size=int(w[5:]))
    fns[w] = (lambda c: lambda q, k, v: new_na.neighborhood_attention(
        q, k, v, 7, **KW, implementation=c))(cfg)
out = {"load_start": bu.machine_load(), "sizes": sizes, "repeats": reps}
res = {}
for s in sizes:
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, s, s, 4, 32), jnp.float32) for x in ks)
  calls = {}
  for name, fn in fns.items():
    calls[(name, "fwd")] = (fn, (q, k, v))
    calls[(name, "fwd_bwd")] = (bu.fwd_bwd(fn), (q, k, v))
  med, _, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
  for key in calls:
    r = res.setdefault(f"{key[0]}/{key[1]}", {"pixels": [], "wall_ms": [],
                                               "cpu_ms": []})
    r["pixels"].append(s * s)
    r["wall_ms"].append(med[key] * 1e3)
    r["cpu_ms"].append(cpu[key] * 1e3)
  print(s, {f"{a}/{b}": f"{med[(a, b)] * 1e3:.2f} ms (cpu {cpu[(a, b)] * 1e3:.2f})"
            for a, b in calls}, bu.machine_load()["loadavg_1m"], flush=True)
for name, r in res.items():
  r["exp_wall"] = bu.loglog_slope(r["pixels"], r["wall_ms"])
  r["exp_cpu"] = bu.loglog_slope(r["pixels"], r["cpu_ms"])
  print(f"{name}: exponent wall {r['exp_wall']:.3f} cpu {r['exp_cpu']:.3f}",
        flush=True)
out["results"] = res
out["load_end"] = bu.machine_load()
print("load", out["load_start"]["loadavg_1m"], "->",
      out["load_end"]["loadavg_1m"])
json.dump(out, open(path, "w"), indent=1)
