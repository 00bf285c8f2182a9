"""Old vs new sequence mechanisms (issue 22 item 3), interleaved in one process.

The old module source is read from git (`--old_rev`, the commit before the
change) and loaded as a separate module, so both versions run side by side
on the same inputs with the bench's shapes (B=1, 4 heads, head_dim 64,
float32). For each S every call (old/new x fwd/fwd_bwd) runs once per
repeat, round-robin (experiments.bench_utils.interleaved_times); medians of
wall and process-CPU time, the log-log exponent fits over S, and the load
averages before/after each length are printed and written as JSON.

Run (nice on a shared machine):
  nice -n 19 .venv/bin/python docs/benchmarks/cpu_perf/seq7_ab.py \
      --mechs=efficient --old_rev=b837c0e --out=docs/benchmarks/cpu_perf/seq7_ab_efficient.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from attnjax import sequence as sq  # noqa: E402
from experiments import bench_utils  # noqa: E402

BATCH, HEADS, HEAD_DIM = 1, 4, 64
FILES = {"efficient": "efficient", "performer": "performer", "agent": "agent",
         "sliding": "sparse"}


def load_old(rev, name):
  src = subprocess.run(["git", "-C", ROOT, "show",
                        f"{rev}:attnjax/sequence/{name}.py"],
                       check=True, capture_output=True, text=True).stdout
  spec = importlib.util.spec_from_loader(f"old_{name}", loader=None)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[f"old_{name}"] = mod        # dataclasses look the module up
  exec(compile(src, f"old_{name}.py", "exec"), mod.__dict__)  # noqa: S102
  return mod


def old_sliding(q, k, v):
  """The gathered sliding-window path (the code before the change, kept as
  `sparse._band_gathered` for wide bands), window 128, block 128, causal."""
  call = sq.sparse.BandCall(q, k, v, None, 128, 0, True, HEAD_DIM ** -0.5,
                            128)
  return sq.sparse._band_gathered(call, 128)


def mechanisms(rev, which):
  new = {"efficient": sq.efficient, "performer": sq.performer,
         "agent": sq.agent, "sliding": sq.sparse}
  proj = sq.orthogonal_random_features(jax.random.key(1), 2 * HEAD_DIM,
                                       HEAD_DIM)
  out = {}
  for m in which:
    # sparse.py registers its ops by name (a second copy cannot be loaded);
    # its old sliding-window path is kept unchanged as `_band_gathered`.
    old = None if m == "sliding" else load_old(rev, FILES[m])
    for tag, mod in (("old", old), ("new", new[m])):
      if m == "efficient":
        fn = functools.partial(mod.efficient_attention)
      elif m == "performer":
        fn = functools.partial(mod.performer_attention, projection=proj)
      elif m == "agent":
        fn = functools.partial(mod.agent_attention, num_agents=64)
      elif tag == "new":
        fn = functools.partial(mod.sliding_window_attention, window_size=128,
                               block_size=128, is_causal=True)
      else:
        fn = old_sliding
      out[(m, tag)] = fn
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--mechs", default="efficient,performer,agent,sliding")
  ap.add_argument("--old_rev", default="b837c0e")
  ap.add_argument("--lens", default="1024,4096,16384")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default="")
  args = ap.parse_args()
  lens = [int(x) for x in args.lens.split(",")]
  fns = mechanisms(args.old_rev, args.mechs.split(","))
  res = {}
  loads = {}
  for s in lens:
    kq, kk, kv = jax.random.split(jax.random.key(s), 3)
    shape = (BATCH, s, HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
    calls = {}
    for (m, tag), fn in fns.items():
      calls[f"{m}|{tag}|fwd"] = (fn, (q, k, v))
      calls[f"{m}|{tag}|fwd_bwd"] = (bench_utils.fwd_bwd(fn), (q, k, v))
    load0 = os.getloadavg()
    reps = args.repeats if s <= 4096 else max(1, min(args.repeats, 3))
    med, _, cmed = bench_utils.interleaved_times(calls, repeats=reps, cpu=True)
    loads[s] = (load0, os.getloadavg())
    for name in calls:
      res.setdefault(name, {})[s] = (med[name], cmed[name])
      print(f"S={s} {name}: wall {1e3 * med[name]:.2f} ms, cpu "
            f"{1e3 * cmed[name]:.2f} ms", flush=True)
    print(f"S={s} load before {load0[0]:.2f} after {loads[s][1][0]:.2f}",
          flush=True)
  fits = {}
  for name, d in res.items():
    xs = sorted(d)
    fits[name] = dict(
        wall_exponent=bench_utils.loglog_slope(xs, [d[x][0] for x in xs]),
        cpu_exponent=bench_utils.loglog_slope(xs, [d[x][1] for x in xs]))
  print("\nexponents over S=%s (wall / cpu):" % args.lens)
  for name, f in fits.items():
    print(f"  {name:32s} {f['wall_exponent']:.3f} / {f['cpu_exponent']:.3f}")
  speed = {}
  for name in res:
    m, tag, mode = name.split("|")
    if tag == "new":
      o = res[f"{m}|old|{mode}"]
      speed[f"{m}|{mode}"] = {s: dict(wall=res[name][s][0] / o[s][0],
                                      cpu=res[name][s][1] / o[s][1])
                              for s in res[name]}
  print("new/old time ratios (wall, cpu):")
  for name, d in speed.items():
    print("  %-24s " % name + "  ".join(
        f"S={s}: {r['wall']:.2f}, {r['cpu']:.2f}" for s, r in d.items()))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), old_rev=args.old_rev,
                     date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     loads={str(s): v for s, v in loads.items()},
                     ms={n: {str(s): [1e3 * x for x in v] for s, v in d.items()}
                         for n, d in res.items()},
                     fits=fits,
                     new_over_old={n: {str(s): r for s, r in d.items()}
                                   for n, d in speed.items()},
                     device=str(jax.devices()[0]), cpu_count=os.cpu_count()),
                f, indent=1)


if __name__ == "__main__":
  main()
