"""CAB's four attention patterns for every sequence mechanism (Zhang et al.
2023, "CAB: Comprehensive Attention Benchmarking on Long Sequence
Modeling"): noncausal-self, causal-self, noncausal-cross, causal-cross.

For every mechanism in `attnjax.sequence.SUPPORT` and every pattern, the
section records whether the call is supported (tried at the shortest
length: a NotImplementedError means "no"; the test checks this column
against SUPPORT), and where it is, forward time and XLA's compiled memory
against softmax attention (`dot_product_attention`, the faster of its
'xla' and 'chunked' backends, same pattern) over `--four_pattern_lens`
(default 1024, 2048, 4096; quick: 128, 256). Self patterns use S = T;
cross patterns use a key/value sequence of S = T / 2 (CAB's cross setting:
a shorter memory). B=1, N=4 query heads, head_dim 64 (kv heads 4; key-driven
GQA gets 2).

Each mechanism runs in the configuration of `_configs()` (e.g. Performer
with 128 features, sliding window 128); a mechanism without an entry is
called as fn(q, k, v, is_causal=...) and reported "no benchmark config" if
that needs more arguments. Costly mechanisms have a length cap
(`_MAX_LEN`): their longer calls are reported, not run. Calls whose
compiled memory exceeds --max_run_gib are reported, not run.

Rows: one per (mechanism, pattern, length) with supported, time_ms, mem_mb,
ratio_vs_softmax (time; the mechanism and the best softmax call are timed
round-robin in one loop, softmax_time_ms) and mem_ratio_vs_softmax; plus
one "support" row per (mechanism, pattern). Figure: time ratio vs length
per pattern (four panels). Run:
  python -m experiments.bench_attention --workdir=runs/four_pattern \
      --sections=four_pattern
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import sequence as sq
from experiments import bench_utils

BATCH, HEADS, HEAD_DIM = 1, 4, 64
PATTERNS = sq.PATTERNS
DEFAULT_LENS = (1024, 2048, 4096)
QUICK_LENS = (128, 256)
# Mechanisms whose cost makes long calls slow on CPU (quadratic with a large
# constant, or cubic): measured up to this query length only.
_MAX_LEN = {"triplewise_attention": 256, "additive_attention": 1024,
            "moba_attention": 2048}


def _band_layout(t, s, block, is_causal):
  nq, nk = -(-t // block), -(-s // block)
  i = np.arange(nq)[:, None]
  j = np.arange(nk)[None, :]
  lay = (np.abs(i - j) < 2) | (j == 0)
  if is_causal:
    lay &= j <= i
  return lay


def _configs():
  """name -> fn(q, k, v, is_causal) in the benchmark configuration."""
  p = functools.partial
  proj = sq.orthogonal_random_features(jax.random.key(1), 2 * HEAD_DIM,
                                       HEAD_DIM)
  h = HEAD_DIM

  def const(shape, value, dtype):
    return jnp.full(shape, value, dtype)

  cfg = {
      "linear_attention": lambda q, k, v, c: sq.linear_attention(
          q, k, v, is_causal=c),
      "efficient_attention": lambda q, k, v, c: sq.efficient_attention(
          q, k, v, is_causal=c),
      "performer_attention": lambda q, k, v, c: sq.performer_attention(
          q, k, v, proj, is_causal=c),
      "sliding_window_attention": lambda q, k, v, c: sq.sliding_window_attention(
          q, k, v, 128, block_size=min(128, q.shape[1]), is_causal=c),
      "block_sparse_attention": lambda q, k, v, c: sq.block_sparse_attention(
          q, k, v, _band_layout(q.shape[1], k.shape[1], 64, c), 64,
          is_causal=c),
      "moba_attention": lambda q, k, v, c: sq.moba_attention(
          q, k, v, block_size=64, top_k=3, is_causal=c),
      "routing_attention": lambda q, k, v, c: sq.routing_attention(
          q, k, v, region_size=64, top_k=4, is_causal=c),
      "agent_attention": lambda q, k, v, c: sq.agent_attention(
          q, k, v, num_agents=min(64, q.shape[1]), is_causal=c),
      "mixture_of_heads_attention": lambda q, k, v, c:
          sq.mixture_of_heads_attention(
              q, k, v, const(q.shape[:3], 0.5, q.dtype), is_causal=c),
      "triplewise_attention": lambda q, k, v, c: sq.triplewise_attention(
          q, k, v, k, v, is_causal=c),
      "additive_attention": lambda q, k, v, c: sq.additive_attention(
          q, k, v, const(q.shape[2:], 0.125, q.dtype), is_causal=c),
      "key_driven_gqa": lambda q, k, v, c: sq.key_driven_gqa(
          q, k[:, :, :2], v[:, :, :2], is_causal=c),
      "lambda_attention": lambda q, k, v, c: sq.lambda_attention(
          q, k, v, is_causal=c, position_embeddings=(
              const((23, h), 0.01, q.dtype) if q.shape[1] == k.shape[1]
              else None)),
      "rcmha_attention": lambda q, k, v, c: sq.rcmha_attention(
          q, k, v, const((33,) + q.shape[2:], 0.01, q.dtype),
          conv_q=const((3,) + q.shape[2:], 0.3, q.dtype),
          conv_k=const((3,) + k.shape[2:], 0.3, k.dtype),
          conv_v=const((3,) + v.shape[2:], 0.3, v.dtype), is_causal=c),
  }
  if hasattr(sq, "lightning_attention"):
    cfg["lightning_attention"] = lambda q, k, v, c: sq.lightning_attention(
        q, k, v, sq.retnet_decays(q.shape[2]), is_causal=c)
  if hasattr(sq, "based_attention"):
    cfg["based_attention"] = lambda q, k, v, c: sq.based_attention(
        q[..., :16], k[..., :16], v, window_size=64, is_causal=c)
  if hasattr(sq, "power_attention"):
    cfg["power_attention"] = lambda q, k, v, c: sq.power_attention(
        q, k, v, 64, is_causal=c)
  if hasattr(sq, "mswa_attention"):
    cfg["mswa_attention"] = lambda q, k, v, c: sq.mswa_attention(
        q, k, v, sq.mswa_window_sizes(q.shape[2], 128), is_causal=c)
  if hasattr(sq, "routing_transformer_attention"):
    cent = jax.random.normal(jax.random.key(2), (16, HEAD_DIM))
    cfg["routing_transformer_attention"] = (
        lambda q, k, v, c: sq.routing_transformer_attention(
            q, k, v, cent, is_causal=c))
  del p
  return cfg


def _call_for(name, cfg):
  if name in cfg:
    return cfg[name]
  fn = getattr(sq, name)
  return lambda q, k, v, c: fn(q, k, v, is_causal=c)


def _lens(ctx):
  f = getattr(ctx, "flags", None)
  spec = getattr(f, "four_pattern_lens", "") if f is not None else ""
  if spec:
    return tuple(int(x) for x in spec.split(",") if x)
  return QUICK_LENS if ctx.quick else DEFAULT_LENS


def _inputs(t, s, dtype):
  kq, kk, kv = jax.random.split(jax.random.key(t * 7 + s), 3)
  return (jax.random.normal(kq, (BATCH, t, HEADS, HEAD_DIM), dtype),
          jax.random.normal(kk, (BATCH, s, HEADS, HEAD_DIM), dtype),
          jax.random.normal(kv, (BATCH, s, HEADS, HEAD_DIM), dtype))


def _kv_len(pattern, t):
  return t if pattern.endswith("self") else max(1, t // 2)


def supported(name, pattern, dtype=jnp.float32, t=None, cfg=None):
  """True/False by trying the call (abstractly: shapes only); a TypeError
  from a missing argument gives None ("no benchmark config")."""
  cfg = _configs() if cfg is None else cfg
  t = QUICK_LENS[0] if t is None else t
  fn = _call_for(name, cfg)
  causal = pattern.startswith("causal")
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype)
            for x in _inputs(t, _kv_len(pattern, t), dtype)]
  try:
    jax.eval_shape(lambda q, k, v: fn(q, k, v, causal), *shapes)
  except NotImplementedError:
    return False
  except TypeError:
    return None
  return True


def run(ctx):
  lens = _lens(ctx)
  dtype = ctx.dtype
  repeats = getattr(ctx, "repeats", 5)
  f = getattr(ctx, "flags", None)
  max_bytes = (getattr(f, "max_run_gib", 8.0) if f is not None else 8.0) * (
      1 << 30)
  only = None
  if f is not None and getattr(f, "impls", ""):
    only = [x for x in f.impls.split(",") if x]
  cfg = _configs()
  names = sorted(sq.SUPPORT)
  if only:
    names = [n for n in names if any(o in n for o in only)]
  rows = []
  soft = {}                                   # (pattern, T) -> (s, bytes)

  def softmax_fn(impl):
    return lambda q, k, v, c: attnjax.dot_product_attention(
        q, k, v, is_causal=c, implementation=impl)

  for pattern in PATTERNS:
    causal = pattern.startswith("causal")
    for t in lens:
      q, k, v = _inputs(t, _kv_len(pattern, t), dtype)
      calls = {impl: (functools.partial(softmax_fn(impl), c=causal), (q, k, v))
               for impl in ("xla", "chunked")}
      med, _ = bench_utils.interleaved_times(calls, repeats=repeats)
      best = min(med, key=med.get)
      mem = ctx.peak_memory_bytes(calls[best][0], q, k, v)
      soft[(pattern, t)] = (med[best], mem, calls[best][0])
      rows.append(dict(section="four_pattern", name="softmax",
                       impl=f"dot_product_attention({best})", mode="fwd",
                       pattern=pattern, causal=causal, seq_len=t,
                       kv_len=k.shape[1], time_ms=1e3 * med[best],
                       mem_mb=mem / 2**20, supported=True))
      ctx.log(f"four_pattern softmax {pattern} T={t}: {1e3 * med[best]:.2f} ms")

  for name in names:
    for pattern in PATTERNS:
      causal = pattern.startswith("causal")
      sup = supported(name, pattern, dtype, t=lens[0], cfg=cfg)
      rows.append(dict(section="four_pattern", name=name, impl="support",
                       pattern=pattern, causal=causal, supported=sup,
                       note=("no benchmark config" if sup is None else None)))
      if not sup:
        continue
      fn = functools.partial(_call_for(name, cfg), c=causal)
      cap = _MAX_LEN.get(name)
      for t in lens:
        q, k, v = _inputs(t, _kv_len(pattern, t), dtype)
        row = dict(section="four_pattern", name=name, impl="attnjax.sequence",
                   mode="fwd", pattern=pattern, causal=causal, seq_len=t,
                   kv_len=k.shape[1], supported=True)
        if cap is not None and t > cap:
          rows.append(dict(row, time_ms=None,
                           note=f"not run: capped at T={cap}"))
          continue
        mem = ctx.peak_memory_bytes(fn, q, k, v)
        if mem > max_bytes:
          rows.append(dict(row, time_ms=None, mem_mb=mem / 2**20,
                           note=f"not run: needs {mem / 2**30:.1f} GiB"))
          continue
        # timed round-robin with the best softmax call of this pattern and
        # length, so load from other processes hits both alike
        st, sm, sfn = soft[(pattern, t)]
        med, _ = bench_utils.interleaved_times(
            {"m": (fn, (q, k, v)), "softmax": (sfn, (q, k, v))},
            repeats=repeats)
        st = med["softmax"]
        rows.append(dict(row, time_ms=1e3 * med["m"], mem_mb=mem / 2**20,
                         softmax_time_ms=1e3 * st,
                         ratio_vs_softmax=med["m"] / st,
                         mem_ratio_vs_softmax=mem / sm if sm > 0 else None))
        ctx.log(f"four_pattern {name} {pattern} T={t}: "
                f"{1e3 * med['m']:.2f} ms ({med['m'] / st:.2f}x softmax)")
  print("\n-- four_pattern summary (longest measured length) --\n" +
        markdown(rows), flush=True)
  return rows


def support_table(rows):
  """{name: {pattern: True/False/None}} from the support rows."""
  out = {}
  for r in rows:
    if r.get("impl") == "support":
      out.setdefault(r["name"], {})[r["pattern"]] = r["supported"]
  return out


def markdown(rows):
  """The summary table: support per pattern and, at the longest measured
  length, time / memory relative to softmax (same pattern)."""
  sup = support_table(rows)
  timed = [r for r in rows if r.get("impl") == "attnjax.sequence" and
           r.get("time_ms") is not None]
  lines = ["| mechanism | " + " | ".join(p.replace("_", "-") for p in PATTERNS)
           + " |", "|---|" + "---|" * len(PATTERNS)]
  for name in sorted(sup):
    cells = []
    for p in PATTERNS:
      s = sup[name].get(p)
      if s is None:
        cells.append("no config")
        continue
      if not s:
        cells.append("no")
        continue
      rs = [r for r in timed if r["name"] == name and r["pattern"] == p]
      if not rs:
        cells.append("yes (not timed)")
        continue
      r = max(rs, key=lambda r: r["seq_len"])
      cells.append(f"yes: {r['ratio_vs_softmax']:.2f}x time, "
                   f"{r['mem_ratio_vs_softmax']:.2f}x mem @T={r['seq_len']}")
    lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows):
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharex=True)
  timed = [r for r in rows if r.get("impl") == "attnjax.sequence" and
           r.get("time_ms") is not None]
  names = sorted({r["name"] for r in timed})
  cmap = plt.get_cmap("tab20")
  markers = "os^vD<>phX*P"
  for ax, pattern in zip(axes.ravel(), PATTERNS):
    for i, name in enumerate(names):
      pts = sorted((r["seq_len"], r["ratio_vs_softmax"]) for r in timed
                   if r["name"] == name and r["pattern"] == pattern)
      if pts:
        ax.loglog([x for x, _ in pts], [y for _, y in pts], base=2,
                  marker=markers[i % len(markers)], color=cmap(i % 20),
                  label=name)
    ax.axhline(1.0, color="k", linestyle="--", linewidth=1,
               label="softmax (= 1)")
    ax.set_title(pattern.replace("_", "-"))
    ax.set_xlabel("query length T (cross: S = T/2)")
    ax.set_ylabel("forward time / softmax time")
    ax.grid(True, which="both", alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  for ax in axes.ravel()[1:]:
    h, l = ax.get_legend_handles_labels()
    for hh, ll in zip(h, l):
      if ll not in labels:
        handles.append(hh)
        labels.append(ll)
  fig.legend(handles, labels, loc="center right", fontsize=7)
  fig.suptitle("Four-pattern efficiency: sequence mechanisms vs softmax "
               "attention (forward)")
  fig.tight_layout(rect=(0, 0, 0.8, 0.96))
  return [(fig, "four_pattern_time_ratio.png")]
