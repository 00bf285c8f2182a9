"""Crossover of attnjax's 'xla' and 'chunked' backends (implementation=None).

At B=1, 8 heads, head_dim 64 (float32) and `--crossover_lens` (default
256..4096; quick: 128, 256), causal and not, forward and forward+backward,
it times 'xla' and 'chunked' round-robin in one process (`--repeats`
interleaved repeats, medians), and derives the rule of
`attnjax.softmax._auto.derive_rule`: from which length 'chunked' is faster.
With `--write_crossover` the rows and the rule are stored in
`attnjax/softmax/crossover.json` under this platform's name, which is what
`implementation=None` then follows.

Rows: one per (causal, seq_len, mode) with xla_s, chunked_s, the ratio
chunked/xla and `auto` (the backend implementation=None picks with the rule
in force when the run started), then one "rule" row per causality.

Run: python -m experiments.bench_attention --sections=crossover \
    --write_crossover --workdir=runs/crossover
"""

from __future__ import annotations

import datetime
import functools
import json
import os

import jax
import jax.numpy as jnp

import attnjax
from attnjax.softmax import _auto
from experiments import bench_utils

BATCH, HEADS, HEAD_DIM = 1, 8, 64


def run(ctx):
  f = ctx.flags
  lens_flag = getattr(f, "crossover_lens", "") if f is not None else ""
  if lens_flag:
    lens = [int(x) for x in lens_flag.split(",") if x]
  else:
    lens = [128, 256] if ctx.quick else [256, 512, 1024, 2048, 4096]
  rows, table_rows = [], []
  platform = jax.default_backend()
  load0 = bench_utils.machine_load()
  for causal in (False, True):
    for s in lens:
      kq, kk, kv = jax.random.split(jax.random.key(s), 3)
      shape = (BATCH, s, HEADS, HEAD_DIM)
      q, k, v = (jax.random.normal(x, shape, jnp.float32) for x in (kq, kk, kv))
      calls = {}
      for impl in ("xla", "chunked"):
        fn = functools.partial(attnjax.dot_product_attention, is_causal=causal,
                               implementation=impl)
        calls[(impl, "fwd")] = (fn, (q, k, v))
        calls[(impl, "fwd_bwd")] = (ctx.fwd_bwd(fn), (q, k, v))
      med, _ = bench_utils.interleaved_times(calls, repeats=ctx.repeats)
      auto = _auto.order(BATCH, s, HEADS, s, causal)[0]
      for mode in ("fwd", "fwd_bwd"):
        xs, cs = med[("xla", mode)], med[("chunked", mode)]
        row = dict(section="crossover", name="dot_product_attention",
                   impl="chunked/xla", mode=mode, batch=BATCH, heads=HEADS,
                   head_dim=HEAD_DIM, seq_len=s, causal=causal,
                   xla_s=xs, chunked_s=cs, time_ms=1e3 * cs,
                   ratio_chunked_over_xla=cs / xs, auto=auto)
        rows.append(row)
        table_rows.append({k_: row[k_] for k_ in
                           ("seq_len", "causal", "mode", "xla_s", "chunked_s")})
        ctx.log(f"crossover causal={causal} S={s} {mode}: chunked/xla "
                f"{cs / xs:.2f}")
  rule = _auto.derive_rule(table_rows)
  for causal in (False, True):
    cross = rule["causal" if causal else "noncausal"]
    rows.append(dict(
        section="crossover", name="rule", impl="summary", causal=causal,
        seq_len=cross,
        note=(f"chunked first from S={cross}" if cross else
              "chunked never faster here: memory rule only")))
  if f is not None and getattr(f, "write_crossover", False):
    path = _auto.TABLE_PATH
    table = {}
    if os.path.exists(path):
      with open(path) as fh:
        table = json.load(fh)
    table[platform] = {
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "measured": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%MZ"),
        "shape": {"batch": BATCH, "heads": HEADS, "head_dim": HEAD_DIM,
                  "dtype": "float32"},
        "repeats": ctx.repeats,
        "load": {"start": load0, "end": bench_utils.machine_load()},
        "command": "python -m experiments.bench_attention --sections=crossover "
                   "--write_crossover",
        "rule": rule,
        "rows": table_rows,
    }
    with open(path, "w") as fh:
      json.dump(table, fh, indent=1, sort_keys=True)
      fh.write("\n")
    _auto.load_table.cache_clear()
    print(f"wrote the {platform} crossover rule {rule} to {path}")
  return rows


def plot(rows):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  styles = {(False, "fwd"): ("tab:blue", "-", "o"),
            (False, "fwd_bwd"): ("tab:blue", "--", "s"),
            (True, "fwd"): ("tab:red", "-", "o"),
            (True, "fwd_bwd"): ("tab:red", "--", "s")}
  for (causal, mode), (color, ls, marker) in styles.items():
    pts = sorted((r["seq_len"], r["ratio_chunked_over_xla"]) for r in rows
                 if r.get("name") == "dot_product_attention"
                 and r["causal"] == causal and r["mode"] == mode)
    if pts:
      ax.plot(*zip(*pts), color=color, linestyle=ls, marker=marker,
              label=f"{'causal' if causal else 'non-causal'} {mode}")
  ax.axhline(1.0, color="gray", linewidth=1)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("sequence length")
  ax.set_ylabel("chunked time / xla time")
  ax.set_title("softmax backends: crossover (below 1: chunked faster)")
  ax.legend(fontsize=7)
  ax.grid(True, which="both", alpha=0.3)
  return [(fig, "crossover.png")]
