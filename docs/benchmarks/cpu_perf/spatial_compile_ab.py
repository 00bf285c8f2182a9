"""Compile time of spatial bench entries before/after (issue 22 (c)): the old
entries closed over their constant arrays (XLA constant-folded what was
computed from them), the new ones take them as arguments. Old module: a copy
of experiments/bench_sections/spatial.py at 6e09029
(`git show 6e09029:experiments/bench_sections/spatial.py > runs/p22/old_spatial.py`).
  python docs/benchmarks/cpu_perf/spatial_compile_ab.py SIZE name1,name2,...
Prints the lower+compile seconds of fwd and fwd_bwd for each, old and new."""
import importlib.util, os, sys, time
import jax, jax.numpy as jnp
from experiments import bench_utils
from experiments.bench_sections import spatial as new

spec = importlib.util.spec_from_file_location("old_spatial", "runs/p22/old_spatial.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)
size = int(sys.argv[1])
names = sys.argv[2].split(",")
q = jax.random.normal(jax.random.key(0), (1, size, size, new.HEADS, new.HEAD_DIM))
print("load", os.getloadavg()[0], flush=True)
for name in names:
  for mode in ("fwd", "fwd_bwd"):
    fo, _ = old._mechanisms(size)[name]
    fn, _, *c = new._mechanisms(size)[name]
    args_new = (q, q, q) + tuple(jnp.asarray(x) for x in (c[0] if c else ()))
    res = []
    for which, f, args in (("old", fo, (q, q, q)), ("new", fn, args_new)):
      f = bench_utils.fwd_bwd(f) if mode == "fwd_bwd" else f
      t0 = time.perf_counter()
      jax.jit(f).lower(*args).compile()
      res.append(f"{which} {time.perf_counter() - t0:.2f} s")
    print(size, name, mode, " | ".join(res), flush=True)
print("load", os.getloadavg()[0], flush=True)
