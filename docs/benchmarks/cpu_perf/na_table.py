"""Markdown rows (time / memory per size, exponent) of the neighborhood
entries of a bench_attention spatial results.json, optionally beside a
baseline run's times.

  python docs/benchmarks/cpu_perf/na_table.py NEW.json [BASELINE.json]
"""
import json
import sys

from experiments import bench_utils as bu

NAMES = ("neighborhood_k7", "dilated_neighborhood_k7_d2",
         "strided_neighborhood_k7_s4")


def rows(path):
  res = json.load(open(path))
  out = {}
  for r in res["rows"]:
    if r.get("name") in NAMES and r.get("impl") == "xla" and r.get("time_ms"):
      out.setdefault((r["name"], r["mode"]), []).append(
          (r["pixels"], r["time_ms"], r["mem_mb"]))
  return res, out


new, nrows = rows(sys.argv[1])
base = rows(sys.argv[2])[1] if len(sys.argv) > 2 else None
print("load:", new["load"])
hdr = "| mechanism | mode | 28x28 | 56x56 | 112x112 | exponent |"
if base:
  hdr += " baseline 28 / 56 / 112 ms | baseline exponent |"
print(hdr)
print("|---" * (hdr.count("|") - 1) + "|")
for (name, mode), pts in nrows.items():
  pts.sort()
  e = bu.loglog_slope([p[0] for p in pts], [p[1] for p in pts])
  line = f"| {name} | {mode} | " + " | ".join(
      f"{t:.3g} ms / {m:.0f} MB" for _, t, m in pts) + f" | {e:.2f} |"
  if base:
    b = sorted(base[(name, mode)])
    eb = bu.loglog_slope([p[0] for p in b], [p[1] for p in b])
    line += " " + " / ".join(f"{t:.3g}" for _, t, _ in b) + f" | {eb:.2f} |"
  print(line)
