"""Higher-order (triple-wise / 2-simplicial) attention: Clift et al. 2019,
"Logic and the 2-Simplicial Transformer"; Sanford et al. 2023 tensor
attention.

Each query i attends over *pairs* of keys (j, l) from two key sequences:

  s_ijl = scale * sum_d q_id k1_jd k2_ld                     (trilinear form)
  p_ijl = softmax over (j, l) of s_ijl
  out_i = sum_jl p_ijl (v1_j * v2_l)                          (pair value)

`triplewise_attention_reference` materializes [B, N, T, S1, S2]: O(n^3)
memory. `triplewise_attention` processes `query_chunk` queries at a time
(lax.map) and loops over chunks of `key_chunk` first keys with an online
softmax (a checkpointed scan: the backward recomputes each step), so the
largest temporary is [query_chunk, key_chunk, S2] per head: O(n) memory for
fixed chunk sizes, same O(n^3) compute.

Causal: j <= i and l <= i (top-left aligned positions).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax._checks import check_floating, check_rank
from attnjax.sequence import _common

SUPPORT = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}


def _check(query, key1, value1, key2, value2):
  names = ("query", "key1", "value1", "key2", "value2")
  arrs = (query, key1, value1, key2, value2)
  for nm, x in zip(names, arrs):
    check_rank(nm, x, (3, 4))
    check_floating(nm, x)
  if len({x.ndim for x in arrs}) != 1:
    raise ValueError(
        "query/key1/value1/key2/value2 must have the same rank, got shapes " +
        ", ".join(f"{nm}={tuple(x.shape)}" for nm, x in zip(names, arrs)))
  unbatched = query.ndim == 3
  if unbatched:
    arrs = tuple(x[None] for x in arrs)
  q, k1, v1, k2, v2 = arrs
  b, t, n, h = q.shape
  for nm, kx, vx in (("1", k1, v1), ("2", k2, v2)):
    if kx.shape[0] != b or kx.shape[3] != h or kx.shape[:3] != vx.shape[:3]:
      raise ValueError(
          f"`key{nm}` must be [B={b}, S, K, H={h}] and `value{nm}` [B, S, K, "
          f"Hv] with matching S, K: shapes query={tuple(query.shape)}, "
          f"key{nm}={tuple(kx.shape)}, value{nm}={tuple(vx.shape)}.")
  if k1.shape[2] != k2.shape[2] or v1.shape[3] != v2.shape[3]:
    raise ValueError(
        "the two key/value sequences must share kv_heads and value head_dim: "
        f"shapes key1={tuple(k1.shape)}, value1={tuple(v1.shape)}, "
        f"key2={tuple(k2.shape)}, value2={tuple(v2.shape)}.")
  kh = k1.shape[2]
  if n % kh:
    raise ValueError(
        f"`query` heads ({n}) must be a multiple of kv heads ({kh}): shapes "
        f"query={tuple(query.shape)}, key1={tuple(key1.shape)}.")
  return q, k1, v1, k2, v2, unbatched


def triplewise_attention_reference(query, key1, value1, key2, value2, *,
                                   is_causal: bool = False,
                                   scale: Optional[float] = None):
  """Exact O(n^3)-memory definition."""
  q, k1, v1, k2, v2, unbatched = _check(query, key1, value1, key2, value2)
  b, t, n, h = q.shape
  kh = k1.shape[2]
  g = n // kh
  f32 = jnp.float32
  rep = lambda x: jnp.repeat(x.astype(f32), g, axis=2)
  k1, v1, k2, v2 = rep(k1), rep(v1), rep(k2), rep(v2)
  s = jnp.einsum("bind,bjnd,blnd->bnijl", q.astype(f32), k1, k2)
  s = s * _common.default_scale(scale, h)
  s1, s2 = k1.shape[1], k2.shape[1]
  ok = jnp.ones((t, s1, s2), bool)
  if is_causal:
    i = jnp.arange(t)[:, None, None]
    ok = (jnp.arange(s1)[None, :, None] <= i) & (jnp.arange(s2)[None, None, :] <= i)
  ok = jnp.broadcast_to(ok, s.shape).reshape(b, n, t, s1 * s2)
  p = _common.masked_softmax(s.reshape(b, n, t, s1 * s2), ok)
  p = p.reshape(b, n, t, s1, s2)
  out = jnp.einsum("bnijl,bjnd,blnd->bind", p, v1, v2).astype(query.dtype)
  return out[0] if unbatched else out


def triplewise_attention(query, key1, value1, key2, value2, *,
                         is_causal: bool = False, scale: Optional[float] = None,
                         query_chunk: int = 64, key_chunk: int = 64):
  """Chunked triple-wise attention (memory bounded by the chunk sizes).

  Args:
    query: [B, T, N, H] (or unbatched rank 3, as all others).
    key1, value1: [B, S1, K, H], [B, S1, K, Hv]: the first key of a pair.
    key2, value2: [B, S2, K, H], [B, S2, K, Hv]: the second key.
    is_causal: j <= i and l <= i.
    scale: default 1/sqrt(H).
    query_chunk, key_chunk: chunk sizes over queries and over first keys.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no admissible pair are zero.
  """
  q, k1, v1, k2, v2, unbatched = _check(query, key1, value1, key2, value2)
  _common.check_positive_int("query_chunk", query_chunk)
  _common.check_positive_int("key_chunk", key_chunk)
  b, t, n, h = q.shape
  kh, hv = k1.shape[2], v1.shape[3]
  g = n // kh
  s1, s2 = k1.shape[1], k2.shape[1]
  empty = _common.empty_output((b, t, n, min(s1, s2), kh, h, hv), query.dtype,
                               unbatched)
  if empty is not None:                 # no pair at all: zero rows
    return empty
  scale = _common.default_scale(scale, h)
  f32 = jnp.float32
  cq, cj = min(query_chunk, t), min(key_chunk, s1)
  tp, sp = _common.round_up(t, cq), _common.round_up(s1, cj)
  nq, nj = tp // cq, sp // cj
  qp = jnp.pad(q.astype(f32), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  qp = qp.reshape(b, nq, cq, kh, g, h).transpose(1, 0, 3, 4, 2, 5)  # [nq,b,k,g,cq,h]
  k1p = jnp.pad(k1.astype(f32), ((0, 0), (0, sp - s1), (0, 0), (0, 0)))
  v1p = jnp.pad(v1.astype(f32), ((0, 0), (0, sp - s1), (0, 0), (0, 0)))
  k1p = k1p.reshape(b, nj, cj, kh, h).transpose(1, 0, 3, 2, 4)      # [nj,b,k,cj,h]
  v1p = v1p.reshape(b, nj, cj, kh, hv).transpose(1, 0, 3, 2, 4)
  k2t = k2.astype(f32).transpose(0, 2, 1, 3)                         # [b,k,s2,h]
  v2t = v2.astype(f32).transpose(0, 2, 1, 3)
  lpos = jnp.arange(s2)

  def per_query_chunk(args):
    qa, a = args                                     # [b,k,g,cq,h]
    ipos = a * cq + jnp.arange(cq)

    @jax.checkpoint
    def step(carry, xs):
      m, l, acc = carry
      kj, vj, jc = xs                                # [b,k,cj,h], [b,k,cj,hv]
      jpos = jc * cj + jnp.arange(cj)
      qk = qa[:, :, :, :, None, :] * kj[:, :, None, None, :, :]   # [b,k,g,cq,cj,h]
      s = jnp.einsum("bkgqjh,bklh->bkgqjl", qk, k2t) * scale
      ok = (jpos < s1)[None, :, None] & jnp.ones((cq, 1, s2), bool)
      if is_causal:
        ok = ok & (jpos[None, :, None] <= ipos[:, None, None]) & (
            lpos[None, None, :] <= ipos[:, None, None])
      neg = _common.NEG                      # finite: no inf is formed
      s = jnp.where(ok, s, neg)
      m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))
      m_safe = jnp.where(m_new > 0.5 * neg, m_new, 0.0)
      p = jnp.where(ok, jnp.exp(s - m_safe[..., None, None]), 0.0)
      corr = jnp.exp(jnp.where(m > 0.5 * neg, m, m_safe) - m_safe)
      pv2 = jnp.einsum("bkgqjl,bkld->bkgqjd", p, v2t)
      contrib = jnp.einsum("bkgqjd,bkjd->bkgqd", pv2, vj)
      l = l * corr + jnp.sum(p, axis=(-2, -1))
      acc = acc * corr[..., None] + contrib
      return (m_new, l, acc), None

    init = (jnp.full((b, kh, g, cq), _common.NEG, f32),
            jnp.zeros((b, kh, g, cq), f32), jnp.zeros((b, kh, g, cq, hv), f32))
    (m, l, acc), _ = jax.lax.scan(step, init, (k1p, v1p, jnp.arange(nj)))
    return acc / jnp.where(l > 0, l, 1.0)[..., None]

  out = jax.lax.map(per_query_chunk, (qp, jnp.arange(nq)))      # [nq,b,k,g,cq,hv]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, n, hv)[:, :t]
  out = out.astype(query.dtype)
  return out[0] if unbatched else out
