"""Ceiling of the 'chunked' forward on this CPU (issue 22 item 4).

The same block loop as `attnjax/softmax/chunked.py`'s forward (lax.map over
query blocks, fori_loop over key blocks, head-major [B, K, G, T, H] layout,
key blocks sliced from K^T, V with a ones column), timed round-robin with
the f32 2048^3 matmul in one process, in four variants:

  chunked   the backend itself (attnjax.dot_product_attention, 'chunked')
  mm_only   the loop with only its two products per block: S = Q K^T and
            acc += S V' (V' = V with the ones column); no max, no exp
  elem_only the loop with only the elementwise work per block: row max,
            exp(s - m), row sum, on a [B, K, G, bq, bk] logits block made
            without a product (a fixed block plus the loop index, so it
            cannot be hoisted); no products
  mm_exp    mm_only plus exp (no running max: the logits of N(0,1) inputs
            scaled by 1/8 stay small), i.e. one elementwise pass fused into
            the product chain instead of two

Each is reported as attention FLOP/s (4 B N S^2 H, the two products) over
the matmul's FLOP/s, wall and per process CPU second, so mm_only is the
ceiling the forward can reach with head_dim-64 products in 256 x 256
blocks; elem_only's time is what the max/exp work adds if nothing overlaps.

Usage (repository root):
  python docs/benchmarks/cpu_perf/ceiling_chunked.py S1,S2 repeats [bq,bk]
"""
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

import attnjax
from experiments import bench_utils


def _dot(x, y, cx, cy):
  return lax.dot_general(x, y, ((tuple(cx), tuple(cy)), ((0, 1), (0, 1))),
                         preferred_element_type=jnp.float32)


def loop(kind, bq, bk):
  """A forward-shaped block loop; q [B, T, N, H] (N kv heads, G = 1)."""

  def f(q, k, v):
    b, t, n, h = q.shape
    s_len = k.shape[1]
    qh = q.transpose(0, 2, 1, 3)[:, :, None]          # [B, K, 1, T, H]
    kt = k.transpose(0, 2, 3, 1)                      # [B, K, H, S]
    vv = v.transpose(0, 2, 1, 3)
    vv = jnp.concatenate([vv, jnp.ones(vv.shape[:-1] + (1,), vv.dtype)], -1)
    base = jnp.sin(jnp.arange(b * n * bq * bk, dtype=jnp.float32)).reshape(
        b, n, 1, bq, bk)
    nk = s_len // bk

    def q_block(i):
      qi = lax.dynamic_slice_in_dim(qh, i * bq, bq, axis=3) * 0.125

      def body(j, carry):
        acc, m, l = carry
        if kind in ("mm_only", "mm_exp"):
          ktj = lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=3)
          vj = lax.dynamic_slice_in_dim(vv, j * bk, bk, axis=2)
          s = _dot(qi, ktj, (4,), (2,))                # [B, K, 1, bq, bk]
          p = jnp.exp(s) if kind == "mm_exp" else s
          return acc + _dot(p, vj, (4,), (2,)), m, l
        # elem_only: row max, exp, row sum of a [B, K, 1, bq, bk] block
        s = base + j.astype(jnp.float32) * 1e-3 + qi[..., :1]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        return acc, m_new, alpha * l + jnp.sum(p, axis=-1)

      init = (jnp.zeros((b, n, 1, bq, h + 1), jnp.float32),
              jnp.full((b, n, 1, bq), -1e30, jnp.float32),
              jnp.zeros((b, n, 1, bq), jnp.float32))
      acc, m, l = lax.fori_loop(0, nk, body, init)
      return acc[..., :h] + (m + l)[..., None]

    return lax.map(q_block, jnp.arange(t // bq, dtype=jnp.int32))

  return f


def main():
  lens = [int(s) for s in sys.argv[1].split(",")]
  reps = int(sys.argv[2])
  bq, bk = (int(x) for x in (sys.argv[3] if len(sys.argv) > 3
                             else "256,256").split(","))
  n = 2048
  a = jax.random.normal(jax.random.key(1), (n, n))
  bm = jax.random.normal(jax.random.key(2), (n, n))
  print("load", os.getloadavg(), "blocks", bq, bk, flush=True)
  for s in lens:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (1, s, 8, 64)) for x in (kq, kk, kv))
    calls = {
        "matmul": (lambda x, y: x @ y, (a, bm)),
        "chunked": (lambda q, k, v: attnjax.dot_product_attention(
            q, k, v, implementation="chunked"), (q, k, v)),
        "mm_only": (loop("mm_only", bq, bk), (q, k, v)),
        "mm_exp": (loop("mm_exp", bq, bk), (q, k, v)),
        "elem_only": (loop("elem_only", bq, bk), (q, k, v)),
    }
    med, _, cpu = bench_utils.interleaved_times(calls, repeats=reps, cpu=True)
    mm, mmc = 2 * n**3 / med["matmul"], 2 * n**3 / cpu["matmul"]
    fl = 4 * 8 * s * s * 64
    print(f"S={s} matmul {mm / 1e9:.0f} GF/s wall, {mmc / 1e9:.0f} GF/s "
          f"per CPU s; load {os.getloadavg()[0]:.1f}", flush=True)
    for name in calls:
      if name == "matmul":
        continue
      print(f"  {name:10s} wall {med[name] * 1e3:7.1f} ms  cpu "
            f"{cpu[name] * 1e3:7.1f} ms  ratio to matmul rate: wall "
            f"{fl / med[name] / mm:.2f}  cpu {fl / cpu[name] / mmc:.2f}",
            flush=True)
    print(f"  elem_only / chunked CPU time: "
          f"{cpu['elem_only'] / cpu['chunked']:.2f}; mm_only / chunked: "
          f"{cpu['mm_only'] / cpu['chunked']:.2f}; (mm_only + elem_only) / "
          f"chunked: {(cpu['mm_only'] + cpu['elem_only']) / cpu['chunked']:.2f}",
          flush=True)


if __name__ == "__main__":
  main()
