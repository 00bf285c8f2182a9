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
At each size all calls (every mechanism, fwd and fwd_bwd) are timed
round-robin (`bench_utils.interleaved_times`).

Exponent fits: per (mechanism, mode) the least-squares slope of log time
against log pixels over the sizes >= `FIT_MIN_SIZE` (28x28..112x112 by
default; 14x14 is dominated by fixed per-call costs). Target: <= 1.1 for the
mechanisms whose cost is linear in pixels in theory (`LINEAR_IN_THEORY`).

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
from experiments import bench_utils

HEADS, HEAD_DIM = 4, 32


def _dense(q, k, v, mask=None):
  b, h, w, n, d = q.shape
  f = lambda x: x.reshape(b, h * w, n, x.shape[-1])
  out = attnjax.dot_product_attention(f(q), f(k), f(v), mask=mask,
                                      implementation="xla")
  return out.reshape(q.shape)


def _aggregated(q, k, v):
  """TransNeXt aggregated attention, pooled tokens = 7x7 average of k, v."""
  b, h, w, n, d = q.shape
  pool = lambda x: sp.adaptive_avg_pool(x.reshape(b, h, w, n * d),
                                        (7, 7)).reshape(b, 49, n, d)
  return sp.aggregated_attention(q, k, v, pool(k), pool(v), 3)


def _lka_consts():
  c = HEADS * HEAD_DIM
  ones = lambda *s: np.full(s, 1.0 / np.prod(s[:-1]), np.float32)
  return ones(5, 5, c), ones(7, 7, c), np.eye(c, dtype=np.float32)


def _lka(q, k, v, w5, w7, pw):
  """VAN LKA on the [B, H, W, heads * head_dim] map of q (k, v unused)."""
  del k, v
  x = q.reshape(*q.shape[:3], HEADS * HEAD_DIM)
  out = sp.large_kernel_attention(x, w5, None, w7, None, pw, None, dilation=3)
  return out.reshape(q.shape)


def _focal_consts():
  c = HEADS * HEAD_DIM
  return tuple(np.full((s, s, c), 1.0 / (s * s), np.float32)
               for s in (3, 5)) + (np.eye(c, dtype=np.float32),)


def _focal(q, k, v, k3, k5, proj):
  """FocalNet modulation: q, ctx = k, 3 gates from v's first channels."""
  c = HEADS * HEAD_DIM
  f = lambda x: x.reshape(*x.shape[:3], c)
  out = sp.focal_modulation(f(q), f(k), f(v)[..., :3], (k3, k5), proj)
  return out.reshape(q.shape)


def _strip(q, k, v, w):
  """SANet cubic attention core: horizontal then vertical 7-tap strips
  (w: [B, 1, 7] strip weights)."""
  del k, v
  x = q.reshape(*q.shape[:3], HEADS * HEAD_DIM)
  y = sp.strip_attention(sp.strip_attention(x, w, axis="w"), w, axis="h")
  return y.reshape(q.shape)


def _cnn_map(q):
  return q.reshape(*q.shape[:3], HEADS * HEAD_DIM)


def _triplet(q, k, v, w, gamma, beta):
  del k, v
  out = sp.triplet_attention(_cnn_map(q), w, gamma, beta)
  return out.reshape(q.shape)


def _ela(q, k, v, w, gamma, beta):
  del k, v
  out = sp.efficient_local_attention(_cnn_map(q), w, gamma, beta, 16)
  return out.reshape(q.shape)


def _ulsam(q, k, v, one, zero, third, zero4):
  del k, v
  out = sp.ulsam(_cnn_map(q), one, zero, third, zero4, 4)
  return out.reshape(q.shape)


def _ptv3_coords(size):
  """The pixels as points (x, y, 0), float32 [1, size * size, 3]."""
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.stack([xx, yy, 0 * xx], -1).reshape(1, size * size, 3).astype(
      np.float32)


def _ptv3(q, k, v, coords):
  """PTv3 patch attention on the pixels as points (x, y, 0), Hilbert order."""
  b, h, w, n, d = q.shape
  f = lambda x: x.reshape(b, h * w, n, d)
  out = sp.serialized_attention(f(q), f(k), f(v), jnp.broadcast_to(
      coords, (b, h * w, 3)), min(64, h * w), order="hilbert")
  return out.reshape(q.shape)


SSA_SR, SSA_QK = 2, HEAD_DIM // 4


def _ssa(q, k, v):
  """S2AFormer SSA: q/k compressed to their first HEAD_DIM / 4 channels per
  head, k and v reduced by a stride-2 2x2 depthwise (averaging) conv."""
  b, h, w, n, d = q.shape

  def reduce(x):
    c = x.shape[-2] * x.shape[-1]
    kern = jnp.full((SSA_SR, SSA_SR, c), 1.0 / SSA_SR ** 2, x.dtype)
    r = sp.spatial_reduction(x.reshape(b, h, w, c), kern, stride=SSA_SR)
    return r.reshape(*r.shape[:3], n, -1)

  return sp.strip_self_attention(q[..., :SSA_QK], reduce(k[..., :SSA_QK]),
                                 reduce(v))


def _atlas_scales(size, window=7, stride=2):
  n, l = 1, size
  while l > window:
    l, n = -(-l // stride), n + 1
  return n


def _atlas(q, k, v):
  """Atlas top-down attention of scale 1 over the max-pool scales of k, v."""
  b, h, w, n, d = q.shape
  num = _atlas_scales(h)
  pyr = lambda x: [a.reshape(*a.shape[:3], n, d) for a in sp.multiscale_pyramid(
      x.reshape(b, h, w, n * d), num, stride=2, window_size=7)]
  return sp.multiscale_top_down_attention(q, pyr(k), pyr(v), 7, stride=2)


def _mechanisms(size):
  """name -> (fn(q, k, v, *consts), keys attended per query (for FLOPs)[,
  consts]): constant weights, masks and coordinates are numpy arrays passed
  as arguments (closed over, XLA constant-folds what is computed from them
  at compile time: > 8 s at 56x56 in an earlier run)."""
  s = size * size
  na_mask = sp.neighborhood_mask((size, size), 7)
  pw = np.asarray(sp.convolutional_init(HEADS), np.float32)
  pb = np.zeros((HEADS,), np.float32)
  gate = np.ones((HEADS,), np.float32)
  nr = 7 if size >= 28 else 2
  crpe = np.full((3, 3, HEADS, HEAD_DIM), 1.0 / 9, np.float32)
  c = HEADS * HEAD_DIM
  one_c, zero_c = np.ones((c,), np.float32), np.zeros((c,), np.float32)
  mechs = {
      "dense": (_dense, s),
      "dense_masked_na": (_dense, s, (na_mask,)),
      "neighborhood_k7": (lambda q, k, v: sp.neighborhood_attention(q, k, v, 7),
                          49),
      "dilated_neighborhood_k7_d2": (
          lambda q, k, v: sp.neighborhood_attention(q, k, v, 7, dilation=2), 49),
      # GNA: query blocks of 4 x 4 share their leader's 7 x 7 window
      "strided_neighborhood_k7_s4": (
          lambda q, k, v: sp.neighborhood_attention(q, k, v, 7, stride=4), 49),
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
      "halo_b8_h3": (lambda q, k, v: sp.halo_attention(q, k, v, 8, 3), 14 * 14),
      # the H x W map as a 2-frame clip of H/2 x W rows (same pixel count)
      "video_swin_w2x7x7_shift": (
          lambda q, k, v: sp.window_attention_3d(
              *(x.reshape(x.shape[0], 2, -1, *x.shape[2:]) for x in (q, k, v)),
              (2, 7, 7), shift_size=(1, 3, 3)).reshape(q.shape), 98),
      "coat_factorized_crpe3": (
          lambda q, k, v, crpe: sp.factorized_attention(q, k, v,
                                                        crpe_kernel=crpe),
          None, (crpe,)),
      "transnext_aggregated_k3_p7": (_aggregated, 9 + 49),
      "van_lka_5_7d3": (_lka, None, _lka_consts()),
      "focal_modulation_l2": (_focal, None, _focal_consts()),
      "crossformer_sda_g7": (lambda q, k, v: sp.lsda_attention(q, k, v, 7), 49),
      "crossformer_lda_i7": (
          lambda q, k, v: sp.lsda_attention(q, k, v, 7, mode="lda"),
          (-(-size // 7)) ** 2),
      "strip_k7_hw": (_strip, None,
                      (np.full((1, 1, 7), 1.0 / 7, np.float32),)),
      "hat_ocab_m7_mo11": (
          lambda q, k, v: sp.overlapping_cross_attention(q, k, v, 7, 11), 121),
      "dcal_glca_top10pct": (
          lambda q, k, v: sp.global_local_cross_attention(
              *(x.reshape(x.shape[0], -1, *x.shape[-2:]) for x in (q, k, v)),
              q[..., 0, 0].reshape(q.shape[0], -1), max(1, s // 10))[0],
          s // 10),
      "triplet_k7": (_triplet, None,
                     (np.full((3, 7, 7, 2), 0.01, np.float32),
                      np.ones((3,), np.float32), np.zeros((3,), np.float32))),
      "ela_k7": (_ela, None, (np.full((7, c), 0.1, np.float32), one_c,
                              zero_c)),
      "ulsam_g4": (_ulsam, None, (one_c, zero_c, one_c / c,
                                  np.zeros((4,), np.float32))),
      "spherical_equiangular": (sp.spherical_attention, s),
      "ptv3_hilbert_p64": (_ptv3, min(64, s), (_ptv3_coords(size),)),
      # clusters of <= 49 tokens + 20 sibling boundary tokens (BOAT's code);
      # O(T log T): log2(T / 49) clustering levels, so not LINEAR_IN_THEORY
      "boat_fsla_c49_o20": (
          lambda q, k, v: sp.feature_space_local_attention(q, k, v, 49,
                                                           overlap=20),
          min(s, 49 + 20)),
      # top-down (Eq. 2) of the finest scale: own 7x7 window + the window
      # holding it at every coarser (stride-2 max-pool) scale
      "atlas_top_down_w7_s2": (_atlas, 49 * _atlas_scales(size)),
      "gpsa": (sp.gated_positional_attention, s, (pw, pb, gate)),
      # global attention over the (H/2 x W/2) reduced map, q/k of 8 channels
      "s2aformer_ssa_sr2_qk8": (_ssa, (-(-size // SSA_SR)) ** 2),
  }
  if size > 56:
    # Dense [heads, S, S] positional logits (2.3 GiB at 112x112, over the
    # shared machine's per-process budget with the attention around them).
    del mechs["gpsa"]
  return mechs


def _gflops(name, kpq, size):
  s = size * size
  if name in ("triplet_k7", "ela_k7", "ulsam_g4"):
    # elementwise modules: ~ a few multiply-adds per element (+ small convs)
    return 2 * s * HEADS * HEAD_DIM * 4 / 1e9
  if name == "strip_k7_hw":
    return 2 * s * HEADS * HEAD_DIM * 14 / 1e9
  if name in ("van_lka_5_7d3", "focal_modulation_l2"):
    # multiply-adds of the depthwise convs and the 1x1 conv, x2 for FLOPs
    c = HEADS * HEAD_DIM
    taps = 25 + 49 if name == "van_lka_5_7d3" else 9 + 25
    return 2 * s * c * (taps + c) / 1e9
  if name == "s2aformer_ssa_sr2_qk8":
    # QK^T with the compressed d_qk, PV with the full head dim
    return 2 * s * kpq * HEADS * (SSA_QK + HEAD_DIM) / 1e9
  if name in ("channel", "coat_factorized_crpe3"):
    return 4 * s * HEAD_DIM * HEAD_DIM * HEADS / 1e9
  return 4 * s * kpq * HEADS * HEAD_DIM / 1e9


FIT_MIN_SIZE = 28
EXPONENT_LIMIT = 1.1
LINEAR_IN_THEORY = ("neighborhood_k7", "dilated_neighborhood_k7_d2",
                    "strided_neighborhood_k7_s4",
                    "halo_b8_h3",
                    "video_swin_w2x7x7_shift", "coat_factorized_crpe3",
                    "transnext_aggregated_k3_p7", "van_lka_5_7d3",
                    "focal_modulation_l2", "crossformer_sda_g7", "strip_k7_hw",
                    "hat_ocab_m7_mo11", "triplet_k7", "ela_k7", "ulsam_g4",
                    "ptv3_hilbert_p64",
                    "window_w7", "shifted_window_w7", "grid_g7", "channel")


def run(ctx):
  flags = getattr(ctx, "flags", None)
  only = None
  if flags is not None and getattr(flags, "impls", ""):
    only = [x for x in flags.impls.split(",") if x]
  max_bytes = (getattr(flags, "max_run_gib", 8.0) if flags else 8.0) * (1 << 30)
  repeats = getattr(ctx, "repeats", 3)
  sizes = (14, 28) if ctx.quick else (14, 28, 56, 112)
  spec = getattr(flags, "spatial_sizes", "") if flags is not None else ""
  if spec:
    sizes = tuple(int(x) for x in spec.split(",") if x)
  dtype = ctx.dtype
  rows = []
  for size in sizes:
    ks = jax.random.split(jax.random.key(0), 3)
    shape = (1, size, size, HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(x, shape, dtype) for x in ks)
    mechs = _mechanisms(size)
    calls, size_rows = {}, []
    for mode in ("fwd", "fwd_bwd"):
      for name, (fn, kpq, *consts) in mechs.items():
        args = (q, k, v) + tuple(jnp.asarray(x) for x in
                                 (consts[0] if consts else ()))
        if only and not any(o in name for o in only) and not name.startswith(
            "dense"):
          continue
        call = ctx.fwd_bwd(fn) if mode == "fwd_bwd" else fn
        gf = _gflops(name, kpq, size) * (3 if mode == "fwd_bwd" else 1)
        row = dict(section="spatial", name=name, impl="xla", mode=mode,
                   image_size=f"{size}x{size}", pixels=size * size,
                   heads=HEADS, head_dim=HEAD_DIM,
                   dtype=jnp.dtype(dtype).name, gflops=gf)
        mem = ctx.peak_memory_bytes(call, *args)
        row["mem_mb"] = mem / 2**20
        if mem > max_bytes:
          row.update(time_ms=None, ratio_vs_dense=None,
                     note=f"not run: needs {mem / 2**30:.1f} GiB")
        else:
          calls[(name, mode)] = (call, args)
        size_rows.append(row)
    med, _ = bench_utils.interleaved_times(calls, repeats=repeats)
    for row in size_rows:
      t = med.get((row["name"], row["mode"]))
      if t is None:
        continue
      row["time_ms"] = t * 1e3
      row["gflops_per_s"] = row["gflops"] / t
      ctx.log(f"spatial {row['name']} {size}x{size} {row['mode']}: "
              f"{t * 1e3:.2f} ms, {row['mem_mb']:.1f} MB")
      dense = med.get(("dense", row["mode"]))
      row["ratio_vs_dense"] = dense / t if dense else None
      masked = med.get(("dense_masked_na", row["mode"]))
      if row["name"].startswith("neighborhood") and masked:
        row["ratio_vs_dense_masked"] = masked / t
        row["note"] = f"{row['ratio_vs_dense_masked']:.1f}x vs dense_masked_na"
    rows.extend(size_rows)
  rows.extend(_fits(rows))
  return rows


def _fits(rows):
  fits = []
  for name in dict.fromkeys(r["name"] for r in rows):
    for mode in ("fwd", "fwd_bwd"):
      pts = sorted((r["pixels"], r["time_ms"]) for r in rows
                   if r["name"] == name and r["mode"] == mode
                   and r.get("time_ms")
                   and r["pixels"] >= FIT_MIN_SIZE ** 2)
      if len(pts) < 2:
        continue
      lo, hi = pts[0][0], pts[-1][0]
      fits.append(dict(
          section="spatial", name=name, impl="fit", mode=mode,
          image_size=f"{int(lo ** 0.5)}^2..{int(hi ** 0.5)}^2", pixels=hi,
          exponent=bench_utils.loglog_slope(*zip(*pts)),
          fit_range=f"{lo}..{hi} px",
          linear_in_theory=name in LINEAR_IN_THEORY, mem_mb=None))
  return fits


def targets(rows):
  """Exponent <= 1.1 for mechanisms linear in pixels (issue 22 item 3)."""
  return [dict(target=f"{r['name']} {r['mode']} exponent over "
                      f"{r['image_size']} <= {EXPONENT_LIMIT}",
               value=round(r["exponent"], 3),
               ok=r["exponent"] <= EXPONENT_LIMIT)
          for r in rows if r.get("impl") == "fit"
          and r.get("linear_in_theory") and r.get("exponent") is not None]


def _styles(names):
  """Distinct (color, linestyle, marker) per series: dense baselines black /
  grey, the others tab20 colours with distinct markers."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cmap = plt.get_cmap("tab20")
  markers = "os^vD<>phX*Pd"
  out, i = {}, 0
  for name in names:
    if name == "dense":
      out[name] = ("black", "-", "o")
    elif name == "dense_masked_na":
      out[name] = ("dimgray", "--", "s")
    else:
      out[name] = (cmap(i % 20), "-" if i < 10 else ":", markers[i % len(markers)])
      i += 1
  return out


def plot(rows):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figs = []
  rows = [r for r in rows if r.get("impl") != "fit"]
  names = list(dict.fromkeys(r["name"] for r in rows))
  styles = _styles(names)
  for mode in ("fwd", "fwd_bwd"):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sel = [r for r in rows if r["mode"] == mode]
    for name in dict.fromkeys(r["name"] for r in sel):
      pts = [(r["pixels"], r.get("time_ms"), r["mem_mb"]) for r in sel
             if r["name"] == name]
      tp = [(p, t) for p, t, _ in pts if t is not None]
      color, ls, marker = styles[name]
      kw = dict(color=color, linestyle=ls, marker=marker, markersize=4,
                label=name)
      if tp:
        axes[0].plot(*zip(*tp), **kw)
      axes[1].plot([p for p, _, _ in pts], [m for _, _, m in pts], **kw)
    for ax, lab in zip(axes, ("time (ms)", "compiled memory (MB)")):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("pixels (H x W)")
      ax.set_ylabel(lab)
      ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"spatial attention, {mode}: time")
    axes[1].set_title(f"spatial attention, {mode}: memory")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    figs.append((fig, f"spatial_{mode}.png"))
  return figs
