"""Block-size sweep of the 'chunked' backend (issue 22 item 4): every
(block_q x block_kv) config, causal and not, timed round-robin with an f32
2048^3 matmul in one process, wall and process CPU time.
Usage (from the repository root):
  python docs/benchmarks/cpu_perf/chunked_blocks.py S1,S2 fwd,fwd_bwd \
      256x256,128x128,... repeats [out.json]
Prints per call the time, r (wall) / rcpu (per CPU second) ratios to the
matmul rate, and per config the causal/non-causal time ratio."""
import json, os, sys
import jax
import attnjax
from attnjax.softmax import Chunked
from experiments import bench_utils

lens = [int(s) for s in sys.argv[1].split(",")]
modes = sys.argv[2].split(",")
configs = [tuple(int(x) for x in c.split("x")) for c in sys.argv[3].split(",")]
reps = int(sys.argv[4])
out_path = sys.argv[5] if len(sys.argv) > 5 else None
n = 2048
a = jax.random.normal(jax.random.key(1), (n, n))
bm = jax.random.normal(jax.random.key(2), (n, n))
rows = []
print("load", os.getloadavg(), flush=True)


def make(bq, bk, causal, mode):
  impl = Chunked(block_q=bq, block_kv=bk)
  f = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=causal, implementation=impl)
  return bench_utils.fwd_bwd(f) if mode == "fwd_bwd" else f


for s in lens:
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, s, 8, 64)) for x in (kq, kk, kv))
  for mode in modes:
    calls = {"matmul": (lambda a, b: a @ b, (a, bm))}
    for bq, bk in configs:
      for c in (False, True):
        calls[(bq, bk, c)] = (make(bq, bk, c, mode), (q, k, v))
    med, _, cpu = bench_utils.interleaved_times(calls, repeats=reps, cpu=True)
    mm, mmc = 2 * n**3 / med["matmul"], 2 * n**3 / cpu["matmul"]
    print(f"S={s} {mode} matmul {mm/1e9:.0f} GF/s (cpu {mmc/1e9:.0f}) "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for bq, bk in configs:
      line = [f"  {bq}x{bk}"]
      for c in (False, True):
        fl = 4 * 8 * s * s * 64 * (3.5 if mode == "fwd_bwd" else 1) / (
            2 if c else 1)
        t, tc = med[(bq, bk, c)], cpu[(bq, bk, c)]
        r, rc = fl / t / mm, fl / tc / mmc
        rows.append(dict(seq_len=s, mode=mode, block_q=bq, block_kv=bk,
                         causal=c, time_s=t, cpu_s=tc, ratio_vs_matmul=r,
                         ratio_vs_matmul_cpu=rc, load=os.getloadavg()[0]))
        line.append(f"c={int(c)} {t*1e3:.0f}ms r={r:.2f} rcpu={rc:.2f}")
      t0, t1 = med[(bq, bk, False)], med[(bq, bk, True)]
      c0, c1 = cpu[(bq, bk, False)], cpu[(bq, bk, True)]
      line.append(f"causal/nc={t1/t0:.2f} cpu {c1/c0:.2f}")
      print(" | ".join(line), flush=True)
if out_path:
  with open(out_path, "w") as fh:
    json.dump(rows, fh, indent=1)
