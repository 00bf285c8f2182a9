"""Spatial attention: each mechanism vs dense attention over image sizes.

Inputs [1, H, W, heads=4, head_dim=32] (the NAT/Swin stage-1 head shape),
H = W in 14, 28, 56, 112 (14, 28 with --quick). For every mechanism and
mode (fwd, fwd_bwd = gradient w.r.t. q, k, v) it reports the median time,
XLA's compiled memory, the nominal attention FLOPs (QK^T and PV:
4 * pixels * keys_per_query * heads * head_dim for fwd, x3 for fwd_bwd;
padding and tiling overheads not counted) and the speed ratio against dense
attention over all pixels at the same size. `dense_masked_na` is dense
attention with the 7x7 neighbourhood mask, the baseline of
`neighborhood_k7`'s `ratio_vs_dense_masked` (the >= 10x target at 56x56).
Calls whose compiled memory exceeds --max_run_gib (default 8) are not run.

Run: python -m experiments.bench_attention --sections=spatial --workdir=DIR
     [--impls=neighborhood,dense]  (substring filter on mechanism names)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import attnjax
from attnjax import spatial as sp

HEADS, HEAD_DIM = 4, 32


def _dense(q, k, v, mask=None):
  b, h, w, n, d = q.shape
  f = lambda x: x.reshape(b, h * w, n, x.shape[-1])
  out = attnjax.dot_product_attention(f(q), f(k), f(v), mask=mask,
                                      implementation="xla")
  return out.reshape(q.shape)


def _mechanisms(size):
  """name -> (fn(q, k, v), keys attended per query (for FLOPs))."""
  s = size * size
  na_mask = jnp.asarray(sp.neighborhood_mask((size, size), 7))
  pw = jnp.asarray(sp.convolutional_init(HEADS))
  pb = jnp.zeros((HEADS,))
  gate = jnp.ones((HEADS,))
  nr = 7 if size >= 28 else 2
  mechs = {
      "dense": (_dense, s),
      "dense_masked_na": (functools.partial(_dense, mask=na_mask), s),
      "neighborhood_k7": (lambda q, k, v: sp.neighborhood_attention(q, k, v, 7),
                          49),
      "dilated_neighborhood_k7_d2": (
          lambda q, k, v: sp.neighborhood_attention(q, k, v, 7, dilation=2), 49),
      "window_w7": (lambda q, k, v: sp.window_attention(q, k, v, 7), 49),
      "shifted_window_w7": (
          lambda q, k, v: sp.window_attention(q, k, v, 7, shift_size=3), 49),
      "grid_g7": (lambda q, k, v: sp.grid_attention(q, k, v, 7), 49),
      "axial_hw": (lambda q, k, v: sp.axial_attention(q, k, v, 0)
                   + sp.axial_attention(q, k, v, 1), 2 * size),
      "cswin_sw7": (lambda q, k, v: sp.cross_shaped_window_attention(q, k, v, 7),
                    7 * size),
      "hilo_lofi_pool2": (lambda q, k, v: sp.pooled_attention(q, k, v, 2),
                          (-(-size // 2)) ** 2),
      f"biformer_r{nr}_top4": (
          lambda q, k, v: sp.bi_level_routing_attention(q, k, v, nr, min(4, nr * nr)),
          min(4, nr * nr) * (-(-size // nr)) ** 2),
      "channel": (sp.channel_attention, None),
      "gpsa": (lambda q, k, v: sp.gated_positional_attention(q, k, v, pw, pb, gate),
               s),
  }
  if size > 56:
    # Dense S x S positional logits of constant inputs: XLA constant-folds
    # them at compile time, which at 112x112 costs minutes and GBs.
    del mechs["gpsa"]
  return mechs


def _gflops(name, kpq, size):
  s = size * size
  if name == "channel":
    return 4 * s * HEAD_DIM * HEAD_DIM * HEADS / 1e9
  return 4 * s * kpq * HEADS * HEAD_DIM / 1e9


def run(ctx):
  flags = getattr(ctx, "flags", None)
  only = None
  if flags is not None and getattr(flags, "impls", ""):
    only = [x for x in flags.impls.split(",") if x]
  max_bytes = (getattr(flags, "max_run_gib", 8.0) if flags else 8.0) * (1 << 30)
  repeats = getattr(ctx, "repeats", 3)
  sizes = (14, 28) if ctx.quick else (14, 28, 56, 112)
  dtype = ctx.dtype
  rows = []
  for size in sizes:
    ks = jax.random.split(jax.random.key(0), 3)
    shape = (1, size, size, HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(x, shape, dtype) for x in ks)
    mechs = _mechanisms(size)
    for mode in ("fwd", "fwd_bwd"):
      times = {}
      for name, (fn, kpq) in mechs.items():
        if only and not any(o in name for o in only) and not name.startswith(
            "dense"):
          continue
        call = ctx.fwd_bwd(fn) if mode == "fwd_bwd" else fn
        gf = _gflops(name, kpq, size) * (3 if mode == "fwd_bwd" else 1)
        row = dict(section="spatial", name=name, impl="xla", mode=mode,
                   image_size=f"{size}x{size}", pixels=size * size,
                   heads=HEADS, head_dim=HEAD_DIM,
                   dtype=jnp.dtype(dtype).name, gflops=gf)
        mem = ctx.peak_memory_bytes(call, q, k, v)
        row["mem_mb"] = mem / 2**20
        if mem > max_bytes:
          row.update(time_ms=None, ratio_vs_dense=None,
                     note=f"not run: needs {mem / 2**30:.1f} GiB")
          rows.append(row)
          continue
        t = ctx.time_fn(call, q, k, v, repeats=repeats)
        times[name] = t
        row["time_ms"] = t * 1e3
        row["gflops_per_s"] = gf / t
        rows.append(row)
        ctx.log(f"spatial {name} {size}x{size} {mode}: {t * 1e3:.2f} ms, "
                f"{mem / 2**20:.1f} MB")
      for row in rows:
        if row["image_size"] != f"{size}x{size}" or row["mode"] != mode:
          continue
        t = times.get(row["name"])
        row["ratio_vs_dense"] = (times["dense"] / t if t and "dense" in times
                                 else None)
        if row["name"].startswith("neighborhood") and "dense_masked_na" in times:
          row["ratio_vs_dense_masked"] = times["dense_masked_na"] / t
          row["note"] = (f"{row['ratio_vs_dense_masked']:.1f}x vs "
                         "dense_masked_na")
  return rows


def plot(rows):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figs = []
  for mode in ("fwd", "fwd_bwd"):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sel = [r for r in rows if r["mode"] == mode]
    for name in dict.fromkeys(r["name"] for r in sel):
      pts = [(r["pixels"], r.get("time_ms"), r["mem_mb"]) for r in sel
             if r["name"] == name]
      tp = [(p, t) for p, t, _ in pts if t is not None]
      style = "k--" if name.startswith("dense") else "-o"
      if tp:
        axes[0].plot(*zip(*tp), style, label=name, markersize=3)
      axes[1].plot([p for p, _, _ in pts], [m for _, _, m in pts], style,
                   label=name, markersize=3)
    for ax, lab in zip(axes, ("time (ms)", "compiled memory (MB)")):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("pixels (H x W)")
      ax.set_ylabel(lab)
      ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"spatial attention, {mode}")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figs.append((fig, f"spatial_{mode}.png"))
  return figs
