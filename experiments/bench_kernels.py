"""Attention kernel benchmark: TFLOP/s of forward and forward+backward.

Compares pallas_kernels flash attention (and the Triton kernel via
jax-triton where available) with jax.nn.dot_product_attention ('xla' and
'cudnn') and JAX's shipped Pallas attention (GPU: pallas.ops.gpu.attention;
TPU: pallas.ops.tpu.flash_attention) where importable. bf16, head_dim 64/128,
S 1k-16k by default. FLOPs: 4*B*N*T*S*H forward, 2.5x that for the backward
(so fwd+bwd = 3.5x), halved for causal. The percent column is of the
device's measured bf16 matmul peak (an 8192^2 matmul, 1024^2 with --quick).
Also reports block-sparse (sliding-window layout) and fused 2D neighborhood
time against dense time x visited fraction (issue target: within 1.5x).

Run:  python -m experiments.bench_kernels --workdir=runs/bench_kernels
      python -m experiments.bench_kernels --workdir=/tmp/bk --quick   # CPU ok
Writes DIR/results.json (all rows) and prints a table. On CPU the Pallas
kernels run in interpret mode: those numbers are not performance numbers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments.bench_utils import time_fn
from experiments import common
from experiments.common import write_results
from pallas_kernels import block_sparse as bsa
from pallas_kernels import flash as fa
from pallas_kernels import neighborhood as nb
from pallas_kernels import triton_flash

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output directory.", required=True)
flags.DEFINE_bool("quick", False, "Tiny sweep (runs on CPU in minutes).")
flags.DEFINE_list("head_dims", ["64", "128"], "Head dims.")
flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384"],
                  "Sequence lengths (T = S).")
flags.DEFINE_integer("tokens", 16384, "batch = max(1, tokens // S).")
flags.DEFINE_integer("heads", 16, "Number of heads.")
flags.DEFINE_list("causal", ["false", "true"], "Causal settings.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")


def _matmul_peak(n: int) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  t = time_fn(lambda a, b: a @ b, a, a, repeats=5)
  return 2 * n ** 3 / t / 1e12


def _impls(causal: bool):
  """name -> fn(q, k, v) in [B, T, N, H], or None if unavailable."""
  impls = {
      "pallas_kernels": lambda q, k, v: fa.flash_attention(
          q, k, v, is_causal=causal),
      "xla": lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation="xla"),
  }
  if jax.default_backend() == "gpu":
    impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
    try:
      from jax.experimental.pallas.ops.gpu import attention as jpa
      impls["jax_pallas"] = lambda q, k, v: jpa.mha(
          q, k, v, segment_ids=None, causal=causal)
    except Exception as e:  # noqa: BLE001
      logging.info("jax pallas gpu attention unavailable: %s", e)
    if triton_flash.triton_available():
      impls["triton"] = lambda q, k, v: triton_flash.triton_flash_attention(
          q, k, v, is_causal=causal)
  elif jax.default_backend() == "tpu":
    try:
      from jax.experimental.pallas.ops.tpu import flash_attention as jtpu
      impls["jax_pallas"] = lambda q, k, v: jnp.swapaxes(jtpu.flash_attention(
          *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), causal=causal,
          sm_scale=1.0 / math.sqrt(q.shape[-1])), 1, 2)
    except Exception as e:  # noqa: BLE001
      logging.info("jax pallas tpu attention unavailable: %s", e)
  return impls


def _fwd_bwd(fn):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def main(argv):
  del argv
  quick = FLAGS.quick
  head_dims = [64] if quick else [int(h) for h in FLAGS.head_dims]
  seq_lens = [256] if quick else [int(s) for s in FLAGS.seq_lens]
  heads = 2 if quick else FLAGS.heads
  tokens = 256 if quick else FLAGS.tokens
  repeats = 2 if quick else FLAGS.repeats
  causals = [c.lower() == "true" for c in FLAGS.causal]
  device = jax.devices()[0].device_kind
  peak = _matmul_peak(1024 if quick else 8192)
  logging.info("device %s, bf16 matmul peak %.1f TFLOP/s", device, peak)
  rows = []
  for h in head_dims:
    for s in seq_lens:
      b = max(1, tokens // s)
      key = jax.random.key(0)
      q, k, v = (jax.random.normal(kk, (b, s, heads, h), jnp.bfloat16)
                 for kk in jax.random.split(key, 3))
      for causal in causals:
        flops = 4 * b * heads * s * s * h * (0.5 if causal else 1.0)
        for name, fn in _impls(causal).items():
          row = dict(impl=name, head_dim=h, seq_len=s, batch=b, heads=heads,
                     causal=causal)
          fb = _fwd_bwd(fn)
          try:
            # fwd+bwd includes the forward: a fwd+bwd time <= the forward's
            # is below the timing noise; re-measured, then flagged.
            tf, tb, noisy = common.ordered_timings(lambda: (
                time_fn(fn, q, k, v, repeats=repeats),
                time_fn(fb, q, k, v, repeats=repeats)))
          except Exception as e:  # noqa: BLE001 - report, keep sweeping
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            continue
          # Backward alone = tb - tf, undefined below the noise floor.
          bwd = None if noisy else tb - tf
          row.update(
              below_noise_floor=noisy,
              fwd_ms=tf * 1e3, fwd_bwd_ms=tb * 1e3,
              bwd_ms=None if bwd is None else bwd * 1e3,
              fwd_tflops=flops / tf / 1e12,
              fwd_bwd_tflops=3.5 * flops / tb / 1e12,
              bwd_tflops=None if bwd is None else 2.5 * flops / bwd / 1e12)
          row["fwd_pct_peak"] = 100 * row["fwd_tflops"] / peak
          row["bwd_pct_peak"] = (None if bwd is None else
                                 100 * row["bwd_tflops"] / peak)
          # Faster than the measured matmul peak: a timing below the noise
          # (bwd = fwd+bwd - fwd is a small difference of two noisy times).
          row["above_measured_peak"] = bool(
              row["fwd_pct_peak"] > 100 or (row["bwd_pct_peak"] or 0) > 100)
          rows.append(row)
  # Block-sparse: sliding-window layout vs dense time x visited fraction.
  sparse_rows = []
  h, s = head_dims[-1], seq_lens[-1]
  blk = 64 if quick else 128
  b = max(1, tokens // s)
  q, k, v = (jax.random.normal(kk, (b, s, heads, h), jnp.bfloat16)
             for kk in jax.random.split(jax.random.key(1), 3))
  nq = -(-s // blk)
  t_dense = time_fn(lambda q, k, v: fa.flash_attention(
      q, k, v, block_sizes=fa.BlockSizes(blk, blk, blk, blk)), q, k, v,
                    repeats=repeats)
  for w in ([64] if quick else [256, 1024, 4096]):
    lay = bsa.local_block_layout(nq, nq, blk, blk, w, w)
    frac = bsa.visited_fraction(lay)
    t = time_fn(functools.partial(bsa.block_sparse_attention,
                                  block_layout=lay, block_q=blk,
                                  block_kv=blk), q, k, v, repeats=repeats)
    sparse_rows.append(dict(window=w, visited_fraction=frac, ms=t * 1e3,
                            dense_ms=t_dense * 1e3,
                            ratio_to_dense_x_fraction=t / (t_dense * frac)))
  # Neighborhood: fused 2D kernel vs dense flash over the same tiles x the
  # fraction of tile pairs that hold any neighbour (nb.visited_fraction).
  na_rows = []
  side = 32 if quick else 128
  hb = max(1, tokens // (side * side))
  qi, ki, vi = (jax.random.normal(kk, (hb, side, side, heads, h),
                                  jnp.bfloat16)
                for kk in jax.random.split(jax.random.key(2), 3))
  flat = lambda x: x.reshape(hb, side * side, heads, h)
  tsz = 128                      # pixels per tile (default 8 x 16 tile)
  t_dense_na = time_fn(lambda q, k, v: fa.flash_attention(
      q, k, v, block_sizes=fa.BlockSizes(tsz, tsz, tsz, tsz)),
                       flat(qi), flat(ki), flat(vi), repeats=repeats)
  for ksz in ([5] if quick else [7, 13, 31]):
    frac = nb.visited_fraction((side, side), ksz)
    t = time_fn(functools.partial(nb.neighborhood_attention,
                                  kernel_size=(ksz, ksz)), qi, ki, vi,
                repeats=repeats)
    na_rows.append(dict(image=side, kernel_size=ksz, visited_fraction=frac,
                        ms=t * 1e3, dense_ms=t_dense_na * 1e3,
                        ratio_to_dense_x_fraction=t / (t_dense_na * frac)))
  results = dict(device=device, backend=jax.default_backend(),
                 jax_version=jax.__version__, matmul_peak_tflops=peak,
                 interpret_mode=jax.default_backend() == "cpu",
                 rows=rows, block_sparse=sparse_rows, neighborhood=na_rows)
  path = write_results(FLAGS.workdir, results)
  hdr = (f"{'impl':16s} {'H':>4s} {'S':>6s} {'causal':>6s} {'fwd TF/s':>9s} "
         f"{'%pk':>5s} {'bwd TF/s':>9s} {'%pk':>5s}")
  print(f"device: {device}  bf16 matmul peak: {peak:.3f} TFLOP/s")
  if results["interpret_mode"]:
    print("CPU: Pallas kernels ran in interpret mode; not performance numbers.")
  print(hdr)
  for r in rows:
    if "error" in r:
      print(f"{r['impl']:16s} {r['head_dim']:4d} {r['seq_len']:6d} "
            f"{str(r['causal']):>6s}  error: {r['error'][:60]}")
      continue
    print(f"{r['impl']:16s} {r['head_dim']:4d} {r['seq_len']:6d} "
          f"{str(r['causal']):>6s} {r['fwd_tflops']:9.3f} "
          f"{r['fwd_pct_peak']:5.1f} "
          + (f"{r['bwd_tflops']:9.3f} {r['bwd_pct_peak']:5.1f}"
             if r["bwd_tflops"] is not None else
             "  below noise floor: fwd+bwd timed <= fwd "
             f"({r['fwd_bwd_ms']:.2f} <= {r['fwd_ms']:.2f} ms); "
             "raise --repeats")
          + ("  (above the measured peak: below the noise floor, raise "
             "--repeats)" if r.get("above_measured_peak") else ""))
  for r in sparse_rows:
    print(f"block-sparse window={r['window']}: visited {r['visited_fraction']:.3f}"
          f", {r['ms']:.2f} ms vs dense {r['dense_ms']:.2f} ms -> "
          f"{r['ratio_to_dense_x_fraction']:.2f}x of dense x fraction")
  for r in na_rows:
    print(f"neighborhood {r['image']}x{r['image']} k={r['kernel_size']}: "
          f"visited {r['visited_fraction']:.3f}, {r['ms']:.2f} ms vs dense "
          f"{r['dense_ms']:.2f} ms -> {r['ratio_to_dense_x_fraction']:.2f}x "
          "of dense x fraction")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
