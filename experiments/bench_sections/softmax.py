"""Softmax attention: attnjax backends vs jax.nn.dot_product_attention.

For each (batch, heads, head_dim, seq_len) and mode (fwd, fwd_bwd) it times
every implementation that can serve the call here and reads XLA's compiled
memory for it. Calls whose compiled memory exceeds `--max_run_gib` are not
executed (their memory is still reported: e.g. the xla path at S=32768 needs
the full [B, N, S, S] logits). `ratio_vs_jax_nn` is measured in the same run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import attnjax


def _impls(ctx):
  impls = {
      "jax.nn(xla)": functools.partial(jax.nn.dot_product_attention,
                                       implementation="xla"),
      "attnjax(xla)": functools.partial(attnjax.dot_product_attention,
                                        implementation="xla"),
      "attnjax(chunked)": functools.partial(attnjax.dot_product_attention,
                                            implementation="chunked"),
  }
  if jax.default_backend() == "gpu":
    impls["jax.nn(cudnn)"] = functools.partial(jax.nn.dot_product_attention,
                                               implementation="cudnn")
  if jax.default_backend() != "cpu" or ctx.flags.include_interpret:
    impls["attnjax(pallas)"] = functools.partial(attnjax.dot_product_attention,
                                                 implementation="pallas")
  only = [s for s in ctx.flags.impls.split(",") if s] if ctx.flags.impls else None
  if only:
    impls = {k: v for k, v in impls.items() if any(o in k for o in only)}
  return impls


def run(ctx):
  f = ctx.flags
  rows = []
  dtype = ctx.dtype
  seq_lens = [int(s) for s in f.seq_lens.split(",")]
  head_dims = [int(s) for s in f.head_dims.split(",")]
  batches = [int(s) for s in f.batch_sizes.split(",")]
  modes = f.modes.split(",")
  impls = _impls(ctx)
  max_bytes = f.max_run_gib * (1 << 30)
  for b in batches:
    for hd in head_dims:
      for s in seq_lens:
        key = jax.random.key(0)
        kq, kk, kv = jax.random.split(key, 3)
        shape = (b, s, f.heads, hd)
        q = jax.random.normal(kq, shape, dtype)
        k = jax.random.normal(kk, shape, dtype)
        v = jax.random.normal(kv, shape, dtype)
        for mode in modes:
          base_time = None
          for name, fn in impls.items():
            call = (lambda q, k, v, fn=fn: fn(q, k, v, is_causal=f.causal))
            if mode == "fwd_bwd":
              call = ctx.fwd_bwd(call)
            row = dict(section="softmax", name="dot_product_attention",
                       impl=name, mode=mode, batch=b, heads=f.heads,
                       head_dim=hd, seq_len=s, causal=f.causal,
                       dtype=jnp.dtype(dtype).name)
            try:
              mem = ctx.peak_memory_bytes(call, q, k, v)
            except NotImplementedError as e:
              ctx.log(f"skip {name} {mode} S={s}: {e}")
              continue
            row["mem_mb"] = mem / 2**20
            if mem > max_bytes:
              row["time_ms"] = None
              row["note"] = f"not run: needs {mem / 2**30:.1f} GiB"
            else:
              t = ctx.time_fn(call, q, k, v, repeats=ctx.repeats)
              row["time_ms"] = 1e3 * t
              flops = 4 * b * f.heads * s * s * hd * (3.5 if mode == "fwd_bwd" else 1)
              if f.causal:
                flops /= 2
              row["gflops_per_s"] = flops / t / 1e9
              if name == "jax.nn(xla)":
                base_time = t
              if base_time is not None:
                row["ratio_vs_jax_nn"] = t / base_time
            ctx.log(" ".join(f"{k_}={v_}" for k_, v_ in row.items()))
            rows.append(row)
  return rows


def plot(rows):
  import matplotlib.pyplot as plt
  figs = []
  for mode in sorted({r["mode"] for r in rows}):
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in sorted({r["impl"] for r in rows}):
      pts = sorted((r["seq_len"], r["time_ms"]) for r in rows
                   if r["impl"] == impl and r["mode"] == mode and r.get("time_ms"))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"softmax attention, {mode}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    figs.append((fig, f"softmax_{mode}.png"))
  return figs
