"""Markdown tables of a softmax-section results.json (rows and targets).

  python docs/benchmarks/cpu_softmax/fmt_table.py RESULTS.json
"""
import json
import sys

d = json.load(open(sys.argv[1]))
print(f"command: {d.get('command')}")
ld = d["load"]
print(f"load average (1 min): {ld['start']['loadavg_1m']:.1f} at start, "
      f"{ld['end']['loadavg_1m']:.1f} at end, on {ld['end']['cpu_count']} CPUs\n")
print("| S | causal | mode | impl | wall ms | CPU ms | MiB | / matmul (wall) "
      "| / matmul (CPU) | / jax.nn (wall) |")
print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|")
f = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
for r in d["rows"]:
  if r.get("section") != "softmax" or r.get("impl") == "fit":
    continue
  print(f"| {r['seq_len']} | {'yes' if r['causal'] else 'no'} | "
        f"{r['mode'].replace('fwd_bwd', 'fwd+bwd')} | {r['impl']} | "
        f"{f(r.get('time_ms'), 0)} | {f(r.get('cpu_ms'), 0)} | "
        f"{f(r.get('mem_mb'), 0)} | {f(r.get('ratio_vs_matmul'))} | "
        f"{f(r.get('ratio_vs_matmul_cpu'))} | {f(r.get('ratio_vs_jax_nn'))} |")
print()
ok = sum(t["ok"] for t in d["targets"])
print(f"Targets ({ok} ok, {len(d['targets']) - ok} missed):\n")
for t in d["targets"]:
  print(f"- [{'ok' if t['ok'] else 'MISSED'}] {t['target']}: {t['value']}")
