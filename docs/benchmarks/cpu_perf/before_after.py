"""Before/after in one process: old (pre-H8) vs new linear_attention and
neighborhood_attention, interleaved repeats, wall and process-CPU time."""
import sys, json, functools, importlib.util
import jax, jax.numpy as jnp
from experiments import bench_utils as bu
from attnjax.sequence import linear as new_lin
from attnjax.spatial import neighborhood as new_na
def load(name, path):
  spec = importlib.util.spec_from_file_location(name, path)
  m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
old_lin = load("old_linear", "runs/h8/old_linear.py")
old_na = load("old_neighborhood", "runs/h8/old_neighborhood.py")
which = sys.argv[1]
reps = int(sys.argv[2])
out = {"load_start": bu.machine_load()}
def inputs(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in ks)
def sweep(label, xs, make_args, fns):
  res = {}
  for x in xs:
    args = make_args(x)
    calls = {}
    for name, fn in fns.items():
      calls[(name, "fwd")] = (fn, args)
      calls[(name, "fwd_bwd")] = (bu.fwd_bwd(fn), args)
    med, _, cpu = bu.interleaved_times(calls, repeats=reps, cpu=True)
    for k in calls:
      res.setdefault(k, {"x": [], "wall": [], "cpu": []})
      res[k]["x"].append(x); res[k]["wall"].append(med[k]); res[k]["cpu"].append(cpu[k])
    print(label, x, {f"{a}/{b}": f"{med[(a, b)] * 1e3:.1f}ms cpu {cpu[(a, b)] * 1e3:.1f}" for a, b in calls}, flush=True)
  summary = {}
  for (name, mode), r in res.items():
    summary[f"{name}/{mode}"] = dict(exp_wall=bu.loglog_slope(r["x"], r["wall"]), exp_cpu=bu.loglog_slope(r["x"], r["cpu"]), **r)
  for name in fns:
    f, b = res[(name, "fwd")], res[(name, "fwd_bwd")]
    summary[f"{name}/fb_over_f_at_max"] = dict(wall=b["wall"][-1] / f["wall"][-1], cpu=b["cpu"][-1] / f["cpu"][-1])
  for k, v in summary.items():
    print(label, k, {kk: (round(vv, 3) if isinstance(vv, float) else None) for kk, vv in v.items() if not isinstance(vv, list)}, flush=True)
  return summary
if which == "linear":
  for causal in (False, True):
    fns = {"old": functools.partial(old_lin.linear_attention, is_causal=causal),
           "new": functools.partial(new_lin.linear_attention, is_causal=causal)}
    out[f"linear causal={causal}"] = sweep(f"linear causal={causal}", [1024, 4096, 16384, 65536], lambda s: inputs((1, s, 4, 64), s), fns)
else:
  fns = {"old": lambda q, k, v: old_na.neighborhood_attention(q, k, v, 7),
         "new": lambda q, k, v: new_na.neighborhood_attention(q, k, v, 7)}
  out["na2d k7"] = sweep("na2d k7 pixels", [784, 3136, 12544], lambda p: inputs((1, int(p ** 0.5), int(p ** 0.5), 4, 32)), fns)
out["load_end"] = bu.machine_load()
json.dump(out, open(f"runs/h8/before_after_{which}.json", "w"), indent=1)
