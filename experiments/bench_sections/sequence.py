"""Sequence attention family vs softmax attention (forward time and memory).

Mechanisms from `attnjax.sequence` at B=1, N=4 heads, head_dim 64 over
sequence lengths 1024..16384 (quick: 256, 1024), against the faster of
attnjax's 'xla' and 'chunked' softmax backends (same causality). Softmax is
measured up to `_SOFTMAX_MAX_LEN` (its quadratic time dominates the run
beyond that); triple-wise attention (cubic) only at short lengths.

MoBA is measured up to S=4096 only (see _MAX_LEN).

Rows: one per (mechanism, seq_len) with time_ms, mem_mb and
ratio_vs_softmax; then one "summary" row per mechanism with
`scaling_16k_over_1k` (time at the longest over time at S=1024, the
linear-scaling check: <= 24 for a 16x longer sequence) and
`cpu_scaling_16k_over_1k` (the same from process CPU time, robust to a
shared machine) and `crossover_seq_len` (the first measured length where it is faster than
softmax attention; None if never within the softmax range).

Run: python -m experiments.bench_attention --workdir=runs/bench_sequence \
    --sections=sequence
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

import attnjax
from attnjax import sequence as sq

BATCH, HEADS, HEAD_DIM = 1, 4, 64
_SOFTMAX_MAX_LEN = 8192
_TRIPLEWISE_LENS = (128, 256)
# MoBA gathers top_k * block_size keys per query token (O(T top_k block H)
# memory traffic): linear, but with a large constant on CPU; capped to keep
# the run short.
_MAX_LEN = {"moba": 4096}


def _mechanisms():
  proj = sq.orthogonal_random_features(jax.random.key(1), 2 * HEAD_DIM,
                                       HEAD_DIM)
  p = functools.partial
  # name -> (fn(q, k, v), causal)
  return {
      "linear_attention": (p(sq.linear_attention), False),
      "linear_attention(causal,chunked)": (
          p(sq.linear_attention, is_causal=True), True),
      "efficient_attention": (p(sq.efficient_attention), False),
      "performer_attention(F=128)": (
          p(sq.performer_attention, projection=proj), False),
      "performer_attention(F=128,causal)": (
          p(sq.performer_attention, projection=proj, is_causal=True), True),
      "sliding_window_attention(w=128,causal)": (
          p(sq.sliding_window_attention, window_size=128, block_size=128,
            is_causal=True), True),
      "moba_attention(block=256,top3,causal)": (
          p(sq.moba_attention, block_size=256, top_k=3, is_causal=True), True),
      "routing_attention(region=256,top4)": (
          p(sq.routing_attention, region_size=256, top_k=4), False),
      "agent_attention(64 agents)": (p(sq.agent_attention, num_agents=64),
                                     False),
      "triplewise_attention(causal)": (
          lambda q, k, v: sq.triplewise_attention(q, k, v, k, v,
                                                  is_causal=True), True),
  }


def _softmax_impls():
  return {
      "softmax(xla)": functools.partial(attnjax.dot_product_attention,
                                        implementation="xla"),
      "softmax(chunked)": functools.partial(attnjax.dot_product_attention,
                                            implementation="chunked"),
  }


def _cpu_seconds(fn, *args, repeats=3):
  """Median process CPU seconds per call (all threads; compile excluded).

  On a shared machine wall time includes waiting for a core; CPU time does
  not, so the scaling ratios are also reported from it.
  """
  jfn = jax.jit(fn)
  jax.block_until_ready(jfn(*args))
  ts = []
  for _ in range(repeats):
    t0 = time.process_time()
    jax.block_until_ready(jfn(*args))
    ts.append(time.process_time() - t0)
  return sorted(ts)[len(ts) // 2]


def run(ctx):
  quick = bool(ctx.quick)
  lens = (256, 1024) if quick else (1024, 2048, 4096, 8192, 16384)
  repeats = getattr(ctx, "repeats", 5)
  dtype = ctx.dtype
  rows = []
  softmax_best = {}        # (causal, S) -> seconds

  def inputs(s):
    kq, kk, kv = jax.random.split(jax.random.key(s), 3)
    shape = (BATCH, s, HEADS, HEAD_DIM)
    return (jax.random.normal(kq, shape, dtype),
            jax.random.normal(kk, shape, dtype),
            jax.random.normal(kv, shape, dtype))

  def measure(name, impl, fn, s, extra, cpu=False):
    q, k, v = inputs(s)
    mem = ctx.peak_memory_bytes(fn, q, k, v)
    t = ctx.time_fn(fn, q, k, v, repeats=repeats if s <= 4096 else
                    max(1, min(repeats, 3)))
    row = dict(section="sequence", name=name, impl=impl, batch=BATCH,
               heads=HEADS, head_dim=HEAD_DIM, seq_len=s, time_ms=1e3 * t,
               mem_mb=mem / 2**20, dtype=jnp.dtype(dtype).name, **extra)
    if cpu:
      row["cpu_ms"] = 1e3 * _cpu_seconds(fn, q, k, v)
    ctx.log(f"sequence {name} [{impl}] S={s}: {1e3 * t:.2f} ms, "
            f"{mem / 2**20:.1f} MiB")
    return row, t

  for causal in (False, True):
    for s in lens:
      if s > _SOFTMAX_MAX_LEN:
        continue
      for impl, fn in _softmax_impls().items():
        if impl == "softmax(xla)" and s > 4096:
          continue       # materializes [B, N, S, S] logits: chunked is faster
        call = functools.partial(fn, is_causal=causal)
        row, t = measure("dot_product_attention", impl, call, s,
                         {"causal": causal})
        rows.append(row)
        key = (causal, s)
        softmax_best[key] = min(softmax_best.get(key, float("inf")), t)

  for name, (fn, causal) in _mechanisms().items():
    mech_lens = _TRIPLEWISE_LENS if name.startswith("triplewise") else lens
    if quick and name.startswith("triplewise"):
      mech_lens = (64, 128)
    cap = next((v for k_, v in _MAX_LEN.items() if name.startswith(k_)), None)
    if cap is not None and not quick:
      mech_lens = tuple(s for s in mech_lens if s <= cap)
    times, cpu = {}, {}
    for s in mech_lens:
      row, t = measure(name, "attnjax.sequence", fn, s, {"causal": causal},
                       cpu=True)
      cpu[s] = row["cpu_ms"]
      base = softmax_best.get((causal, s))
      row["ratio_vs_softmax"] = None if base is None else t / base
      rows.append(row)
      times[s] = t
    lo, hi = min(times), max(times)
    cross = next((s for s in sorted(times)
                  if (causal, s) in softmax_best and
                  times[s] < softmax_best[(causal, s)]), None)
    rows.append(dict(
        section="sequence", name=name, impl="summary", seq_len=hi,
        time_ms=1e3 * times[hi], mem_mb=None, causal=causal,
        scaling_16k_over_1k=(times[hi] / times[lo]) if hi > lo else None,
        cpu_scaling_16k_over_1k=(cpu[hi] / cpu[lo]) if hi > lo else None,
        scaling_lengths=f"{hi}/{lo}",
        crossover_seq_len=cross,
        note=("faster than softmax from S=%d" % cross) if cross else
        "not faster than softmax at the measured lengths"))
  return rows


def plot(rows):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figs = []
  for causal in (False, True):
    fig, ax = plt.subplots(figsize=(7, 5))
    series = {}
    for r in rows:
      if r.get("impl") == "summary" or r.get("causal") != causal:
        continue
      label = r["name"] if r["name"] != "dot_product_attention" else r["impl"]
      series.setdefault(label, []).append((r["seq_len"], r["time_ms"]))
    for label, pts in sorted(series.items()):
      pts.sort()
      ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=label,
                base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("forward time (ms)")
    ax.set_title(f"sequence family vs softmax ({'causal' if causal else 'non-causal'})")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    figs.append((fig, f"sequence_{'causal' if causal else 'noncausal'}.png"))
  return figs
