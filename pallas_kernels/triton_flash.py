"""Flash attention forward/backward written in Triton, called via jax-triton.

GPU only. `jax_triton` and `triton` are imported lazily and guarded:
`triton_available()` says whether this module can run here, and
`triton_flash_attention` raises NotImplementedError (saying why) where it
cannot. JAX 0.11+ deprecates the Pallas *Triton* lowering in favour of Mosaic
GPU and points hand-written Triton users to jax-triton, which is what this
file uses (the Pallas kernels in flash.py stay portable).

Scope: [B, T, N, H] inputs (GQA via N % K == 0), power-of-two head dim in
{16, ..., 256}, causal (top-left aligned) or not, any T/S (masked tails),
float16/bfloat16/float32. No bias, mask, window or segment ids (use the
Pallas kernels for those). Forward saves the log-sum-exp; backward is a
dK/dV kernel (grid over key tiles) and a dQ kernel (grid over query tiles),
joined by jax.custom_vjp. Layout inside: heads-major contiguous [B, N, L, H].
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

_IMPORT_ERROR: Optional[str] = None
try:  # Guarded: attnjax and pallas_kernels work without jax-triton.
  import jax_triton as jt
  import triton
  import triton.language as tl
except Exception as e:  # ImportError, or a broken CUDA/Triton install
  jt = triton = tl = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def triton_available() -> bool:
  """True when jax-triton imports and the default backend is a GPU."""
  return _IMPORT_ERROR is None and jax.default_backend() == "gpu"


def why_unavailable() -> Optional[str]:
  if _IMPORT_ERROR is not None:
    return f"jax_triton/triton not importable ({_IMPORT_ERROR})"
  if jax.default_backend() != "gpu":
    return f"Triton kernels need a GPU (default backend {jax.default_backend()!r})"
  return None


if triton is not None:

  @triton.jit
  def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, T, S, scale,
                  N: tl.constexpr, G: tl.constexpr, H: tl.constexpr,
                  BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr):
    i = tl.program_id(0)
    bn = tl.program_id(1)               # b * N + n
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_q = i * BQ + tl.arange(0, BQ)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, H)
    q_base = q_ptr + bn * T * H
    k_base = k_ptr + bkv * S * H
    v_base = v_ptr + bkv * S * H
    q = tl.load(q_base + offs_q[:, None] * H + offs_h[None, :],
                mask=offs_q[:, None] < T, other=0.0)
    m = tl.full((BQ,), -1e30, tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, H), tl.float32)
    hi = S
    if CAUSAL:
      hi = tl.minimum(S, (i + 1) * BQ)
    for start in range(0, hi, BK):
      kk = start + offs_k
      kmask = kk[:, None] < S
      k = tl.load(k_base + kk[:, None] * H + offs_h[None, :], mask=kmask,
                  other=0.0)
      v = tl.load(v_base + kk[:, None] * H + offs_h[None, :], mask=kmask,
                  other=0.0)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = kk[None, :] < S
      if CAUSAL:
        valid = valid & (kk[None, :] <= offs_q[:, None])
      s = tl.where(valid, s, -1e30)
      m_new = tl.maximum(m, tl.max(s, 1))
      p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
      alpha = tl.exp(m - m_new)
      l = alpha * l + tl.sum(p, 1)
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
      m = m_new
    has = l > 0.0
    l_safe = tl.where(has, l, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + bn * T * H + offs_q[:, None] * H + offs_h[None, :],
             out.to(o_ptr.dtype.element_ty), mask=offs_q[:, None] < T)
    lse = tl.where(has, m + tl.log(l_safe), float("-inf"))
    tl.store(lse_ptr + bn * T + offs_q, lse, mask=offs_q < T)

  @triton.jit
  def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, T,
                 S, scale, N: tl.constexpr, G: tl.constexpr, H: tl.constexpr,
                 BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr):
    i = tl.program_id(0)
    bn = tl.program_id(1)
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_q = i * BQ + tl.arange(0, BQ)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, H)
    qmask = offs_q[:, None] < T
    row = bn * T * H + offs_q[:, None] * H + offs_h[None, :]
    q = tl.load(q_ptr + row, mask=qmask, other=0.0)
    do = tl.load(do_ptr + row, mask=qmask, other=0.0)
    lse = tl.load(lse_ptr + bn * T + offs_q, mask=offs_q < T, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(delta_ptr + bn * T + offs_q, mask=offs_q < T, other=0.0)
    dq = tl.zeros((BQ, H), tl.float32)
    hi = S
    if CAUSAL:
      hi = tl.minimum(S, (i + 1) * BQ)
    for start in range(0, hi, BK):
      kk = start + offs_k
      kmask = kk[:, None] < S
      k = tl.load(k_ptr + bkv * S * H + kk[:, None] * H + offs_h[None, :],
                  mask=kmask, other=0.0)
      v = tl.load(v_ptr + bkv * S * H + kk[:, None] * H + offs_h[None, :],
                  mask=kmask, other=0.0)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = kk[None, :] < S
      if CAUSAL:
        valid = valid & (kk[None, :] <= offs_q[:, None])
      p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
      dp = tl.dot(do, tl.trans(v))
      ds = p * (dp - delta[:, None])
      dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + row, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=qmask)

  @triton.jit
  def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr,
                  dv_ptr, T, S, scale, N: tl.constexpr, G: tl.constexpr,
                  H: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                  CAUSAL: tl.constexpr):
    # One program per (key tile, query head); dK/dV per query head, summed
    # over the GQA group outside.
    j = tl.program_id(0)
    bn = tl.program_id(1)
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_k = j * BK + tl.arange(0, BK)
    offs_q = tl.arange(0, BQ)
    offs_h = tl.arange(0, H)
    kmask = offs_k[:, None] < S
    krow = bkv * S * H + offs_k[:, None] * H + offs_h[None, :]
    k = tl.load(k_ptr + krow, mask=kmask, other=0.0)
    v = tl.load(v_ptr + krow, mask=kmask, other=0.0)
    dk = tl.zeros((BK, H), tl.float32)
    dv = tl.zeros((BK, H), tl.float32)
    lo = 0
    if CAUSAL:
      lo = (j * BK) // BQ * BQ
    for start in range(lo, T, BQ):
      qq = start + offs_q
      qmask = qq[:, None] < T
      row = bn * T * H + qq[:, None] * H + offs_h[None, :]
      q = tl.load(q_ptr + row, mask=qmask, other=0.0)
      do = tl.load(do_ptr + row, mask=qmask, other=0.0)
      lse = tl.load(lse_ptr + bn * T + qq, mask=qq < T, other=0.0)
      lse = tl.where(lse == float("-inf"), 0.0, lse)
      delta = tl.load(delta_ptr + bn * T + qq, mask=qq < T, other=0.0)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = (offs_k[None, :] < S) & (qq[:, None] < T)
      if CAUSAL:
        valid = valid & (offs_k[None, :] <= qq[:, None])
      p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
      dv += tl.dot(tl.trans(p.to(do.dtype)), do)
      dp = tl.dot(do, tl.trans(v))
      ds = p * (dp - delta[:, None])
      dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dkv_row = bn * S * H + offs_k[:, None] * H + offs_h[None, :]
    tl.store(dk_ptr + dkv_row, dk * scale, mask=kmask)
    tl.store(dv_ptr + dkv_row, dv, mask=kmask)


def _cdiv(a, b):
  return -(-a // b)


def _fwd(cfg, q, k, v):
  b, n, t, h = q.shape
  s = k.shape[2]
  scale, causal, bq, bk, g, warps, stages = cfg
  out, lse = jt.triton_call(
      q, k, v, t, s, scale, kernel=_fwd_kernel,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, t), jnp.float32)],
      grid=(_cdiv(t, bq), b * n), num_warps=warps, num_stages=stages,
      N=n, G=g, H=h, BQ=bq, BK=bk, CAUSAL=causal)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tri(cfg, q, k, v):
  return _fwd(cfg, q, k, v)


def _tri_fwd(cfg, q, k, v):
  out, lse = _fwd(cfg, q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _tri_bwd(cfg, res, cts):
  q, k, v, out, lse = res
  dout, dlse = cts
  b, n, t, h = q.shape
  nkv, s = k.shape[1], k.shape[2]
  scale, causal, bq, bk, g, warps, stages = cfg
  delta = jnp.einsum("bnth,bnth->bnt", dout.astype(jnp.float32),
                     out.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  dout = dout.astype(q.dtype)
  meta = dict(N=n, G=g, H=h, BQ=bq, BK=bk, CAUSAL=causal)
  dq = jt.triton_call(
      q, k, v, dout, lse, delta, t, s, scale, kernel=_dq_kernel,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      grid=(_cdiv(t, bq), b * n), num_warps=warps, num_stages=stages, **meta)
  dk, dv = jt.triton_call(
      q, k, v, dout, lse, delta, t, s, scale, kernel=_dkv_kernel,
      out_shape=[jax.ShapeDtypeStruct((b, n, s, h), jnp.float32)] * 2,
      grid=(_cdiv(s, bk), b * n), num_warps=warps, num_stages=stages, **meta)
  dk = dk.reshape(b, nkv, g, s, h).sum(2).astype(k.dtype)
  dv = dv.reshape(b, nkv, g, s, h).sum(2).astype(v.dtype)
  return dq, dk, dv


_tri.defvjp(_tri_fwd, _tri_bwd)


def triton_flash_attention(query, key, value, *, is_causal: bool = False,
                           scale: Optional[float] = None, block_q: int = 128,
                           block_kv: int = 64, num_warps: int = 4,
                           num_stages: int = 2, return_lse: bool = False):
  """Flash attention via jax_triton.triton_call (GPU only), differentiable.

  query [B, T, N, H], key/value [B, S, K, H], N % K == 0, H a power of two
  in [16, 256], value head dim == H. Raises NotImplementedError where Triton
  cannot run, ValueError for bad shapes.
  """
  why = why_unavailable()
  if why is not None:
    raise NotImplementedError(why)
  if query.ndim != 4 or key.ndim != 4 or value.shape != key.shape:
    raise ValueError(
        f"need query [B, T, N, H] and key/value [B, S, K, H] of equal shape; "
        f"got query {query.shape}, key {key.shape}, value {value.shape}.")
  b, t, n, h = query.shape
  nkv = key.shape[2]
  if key.shape[0] != b or key.shape[-1] != h or n % nkv:
    raise ValueError(
        f"`query` {query.shape} and `key` {key.shape} must share batch and "
        "head_dim, with query heads a multiple of kv heads.")
  if h < 16 or h > 256 or h & (h - 1):
    raise NotImplementedError(
        f"Triton flash attention needs a power-of-two head_dim in [16, 256], "
        f"got {h}.")
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  cfg = (scale, bool(is_causal), block_q, block_kv, n // nkv, num_warps,
         num_stages)
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  out, lse = _tri(cfg, q, k, v)
  out = jnp.swapaxes(out, 1, 2)
  return (out, lse) if return_lse else out
