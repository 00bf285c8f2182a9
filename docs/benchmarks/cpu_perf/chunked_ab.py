"""A/B of the chunked backend (issue 22 item 4): the pre-change module vs the
current one, timed round-robin with an f32 2048^3 matmul, wall and process
CPU time. Make the old module first (run from the repository root):
  mkdir -p runs/p22 && git show aa2c46c:attnjax/softmax/chunked.py > runs/p22/old_chunked.py
Usage: chunked_ab.py S1,S2 fwd,fwd_bwd false|true|both repeats [old,new]
Prints per call the time and r (wall) / rcpu (per CPU second) ratios to the
matmul rate, and causal/non-causal time ratios."""
import contextlib, functools, importlib.util, os, sys, time
import jax, jax.numpy as jnp
import attnjax
from attnjax.softmax import chunked as chunked_lib
from experiments import bench_utils

# OLD_CHUNKED=path picks another saved module (default runs/p22/old_chunked.py).
spec = importlib.util.spec_from_file_location(
    "old_chunked", os.environ.get("OLD_CHUNKED", "runs/p22/old_chunked.py"))
old = importlib.util.module_from_spec(spec); sys.modules["old_chunked"] = old; spec.loader.exec_module(old)

@contextlib.contextmanager
def patched(fn):
  cur = chunked_lib.chunked_attention
  chunked_lib.chunked_attention = fn
  try: yield
  finally: chunked_lib.chunked_attention = cur

def make(which, causal, mode):
  def f(q, k, v):
    if which == "old":
      with patched(old.chunked_attention):
        return attnjax.dot_product_attention(q, k, v, is_causal=causal, implementation="chunked")
    return attnjax.dot_product_attention(q, k, v, is_causal=causal, implementation="chunked")
  return bench_utils.fwd_bwd(f) if mode == "fwd_bwd" else f

lens = [int(s) for s in sys.argv[1].split(",")]
modes = sys.argv[2].split(",")
causals = {"false": [False], "true": [True], "both": [False, True]}[sys.argv[3]]
reps = int(sys.argv[4])
whiches = sys.argv[5].split(",") if len(sys.argv) > 5 else ["old", "new"]
n = 2048
a = jax.random.normal(jax.random.key(1), (n, n)); bm = jax.random.normal(jax.random.key(2), (n, n))
print("load", os.getloadavg(), flush=True)
for s in lens:
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, s, 8, 64)) for x in (kq, kk, kv))
  for mode in modes:
    calls = {"matmul": (lambda a, b: a @ b, (a, bm))}
    for c in causals:
      for w in whiches:
        calls[f"{w} c={int(c)}"] = (make(w, c, mode), (q, k, v))
    med, _, cpu = bench_utils.interleaved_times(calls, repeats=reps, cpu=True)
    mm = 2 * n**3 / med["matmul"]
    mmc = 2 * n**3 / cpu["matmul"]
    line = [f"S={s} {mode} mm={mm/1e9:.0f}GF/s (cpu {mmc/1e9:.0f})"]
    for name in calls:
      if name == "matmul": continue
      c = name.endswith("c=1")
      fl = 4 * 8 * s * s * 64 * (3.5 if mode == "fwd_bwd" else 1) / (2 if c else 1)
      line.append(f"{name}: {med[name]*1e3:.0f}ms r={fl/med[name]/mm:.2f} rcpu={fl/cpu[name]/mmc:.2f}")
    for w in whiches:
      if f"{w} c=1" in med and f"{w} c=0" in med:
        line.append(f"{w} causal/nc={med[f'{w} c=1']/med[f'{w} c=0']:.2f} cpu {cpu[f'{w} c=1']/cpu[f'{w} c=0']:.2f}")
    print(" | ".join(line), "| load", os.getloadavg()[0], flush=True)
