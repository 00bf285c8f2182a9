"""Neighborhood 2D k=7 before/after for every variant the spatial bench times
(issue 22 item 3): k=7, k=7 dilation 2, k=7 stride 4; one process.

old = a copy of attnjax/spatial/neighborhood.py (NA_OLD=<path>, its Op renamed
"neighborhood_attention_old" so both register; old_<x>: NA_OLD_<X>=<path>, its
Op renamed too), new = the working tree;
new_t<T>: NeighborhoodXLA(tile_size=T); new_s<KiB>: step_bytes=KiB * 1024;
new_noloop: row_loop=False. B=1, 4 heads, head_dim 32 (the spatial section's
inputs), float32; NA_MODES=fwd (or fwd_bwd) times only that mode. For each size, every (variant, impl, fwd / fwd+bwd) call
is timed round-robin (wall and process CPU); exponents are least-squares
fits of time vs pixels over the sizes given.

  NA_OLD=runs/na7/old_neighborhood.py python docs/benchmarks/cpu_perf/na7_ab.py \
      28,56,112 5 old,new k7,d2,s4 [out.json]
"""
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp

from attnjax.spatial import neighborhood as new_na
from experiments import bench_utils as bu

VARIANTS = {"k7": {}, "d2": {"dilation": 2}, "s4": {"stride": 4}}


def _load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  m = importlib.util.module_from_spec(spec)
  sys.modules[name] = m
  spec.loader.exec_module(m)
  return m


def _impl(w):
  if w == "new":
    return new_na.neighborhood_attention, None
  if w == "new_noloop":
    return new_na.neighborhood_attention, new_na.NeighborhoodXLA(
        row_loop=False)
  if w.startswith("new_t"):
    return new_na.neighborhood_attention, new_na.NeighborhoodXLA(
        tile_size=int(w[5:]))
  if w.startswith("new_s"):
    return new_na.neighborhood_attention, new_na.NeighborhoodXLA(
        step_bytes=int(w[5:]) * 1024)
  raise ValueError(w)


def main():
  sizes = [int(x) for x in sys.argv[1].split(",")]
  reps = int(sys.argv[2])
  which = (sys.argv[3] if len(sys.argv) > 3 else "old,new").split(",")
  variants = (sys.argv[4] if len(sys.argv) > 4 else "k7,d2,s4").split(",")
  path = sys.argv[5] if len(sys.argv) > 5 else "runs/na7/ab.json"
  impls = {}
  for w in which:
    if w.startswith("old"):   # old, old_x: copies at $NA_OLD, $NA_OLD_X
      old = _load(f"{w}_neighborhood", os.environ["NA_" + w.upper()])
      impls[w] = (old.neighborhood_attention, None)
    else:
      impls[w] = _impl(w)
  fns = {}
  for var in variants:
    for w, (f, cfg) in impls.items():
      fns[(var, w)] = (lambda f, cfg, kw: lambda q, k, v: f(
          q, k, v, 7, implementation=cfg, **kw))(f, cfg, VARIANTS[var])
  out = {"load_start": bu.machine_load(), "sizes": sizes, "repeats": reps,
         "impls": which, "variants": variants}
  res = {}
  for s in sizes:
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (1, s, s, 4, 32), jnp.float32)
               for x in ks)
    calls = {}
    for (var, w), fn in fns.items():
      calls[(var, w, "fwd")] = (fn, (q, k, v))
      calls[(var, w, "fwd_bwd")] = (bu.fwd_bwd(fn), (q, k, v))
    if os.environ.get("NA_MODES"):   # e.g. NA_MODES=fwd: time only those
      keep = os.environ["NA_MODES"].split(",")
      calls = {c: x for c, x in calls.items() if c[2] in keep}
    med, samples, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
    for key in calls:
      r = res.setdefault("/".join(key), {"pixels": [], "wall_ms": [],
                                         "cpu_ms": []})
      r["pixels"].append(s * s)
      r["wall_ms"].append(med[key] * 1e3)
      r["cpu_ms"].append(cpu[key] * 1e3)
      r.setdefault("wall_min_ms", []).append(min(samples[key]) * 1e3)
    print(s, "load", bu.machine_load()["loadavg_1m"], flush=True)
    for key in calls:
      print(f"  {'/'.join(key):24s} {med[key] * 1e3:8.2f} ms "
            f"(cpu {cpu[key] * 1e3:8.2f}, min wall {min(samples[key]) * 1e3:8.2f})",
            flush=True)
  for name, r in res.items():
    r["exp_wall"] = bu.loglog_slope(r["pixels"], r["wall_ms"])
    r["exp_cpu"] = bu.loglog_slope(r["pixels"], r["cpu_ms"])
    r["exp_wall_min"] = bu.loglog_slope(r["pixels"], r["wall_min_ms"])
    print(f"{name:24s} exponent wall {r['exp_wall']:.3f} cpu "
          f"{r['exp_cpu']:.3f} min wall {r['exp_wall_min']:.3f}", flush=True)
  out["results"] = res
  out["load_end"] = bu.machine_load()
  print("load", out["load_start"]["loadavg_1m"], "->",
        out["load_end"]["loadavg_1m"])
  json.dump(out, open(path, "w"), indent=1)


if __name__ == "__main__":
  main()
