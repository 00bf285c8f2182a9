"""Efficient Attention (Shen et al. 2021, "Efficient Attention: Attention with
Linear Complexities").

  out = rho_q(Q) (rho_k(K)^T V)

with rho_q a softmax over the channels of each query and rho_k a softmax over
key positions for each channel. The global context `rho_k(K)^T V` [H, Hv] is
formed first, so cost is O((T + S) H Hv). The paper's "dot-product
equivalence" (rho_q(Q) rho_k(K)^T) V is the quadratic reference.

Causal forms are not supported: rho_k normalizes each channel over *all* key
positions, so the context of query i depends on keys after i.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.sequence import _common
from attnjax.sequence._common import to_groups

SUPPORT = {
    "noncausal_self": True,
    "causal_self": False,
    "noncausal_cross": True,
    "causal_cross": False,
}
_CAUSAL_WHY = (
    "efficient_attention normalizes each key channel by a softmax over all "
    "key positions (Shen et al.), so a query's context depends on later keys; "
    "use linear_attention for a causal linear-cost mechanism.")


def _validate(query, key, value, mask, is_causal, bias, dropout_rate, scale):
  """Checks the call; masked key/value slots zeroed, scale resolved."""
  if is_causal:
    raise NotImplementedError(_CAUSAL_WHY)
  _common.reject("bias", bias, "efficient_attention",
                 "the [T, S] scores are never formed.")
  _common.reject("dropout_rate", dropout_rate, "efficient_attention",
                 "the attention weights are never materialized.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="efficient_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  # Default 1.0 (a temperature on q and k, not 1/sqrt(d)); NaN/Inf refused.
  scale = 1.0 if scale is None else _common.default_scale(scale, 1)
  return query, key, value, kv_mask, scale, dims, unbatched


def _prepare(query, key, value, mask, is_causal, bias, dropout_rate, scale):
  """Whole-sequence rho_q(Q) [B,T,K,G,H] and rho_k(K) [B,S,K,H] (reference)."""
  query, key, value, kv_mask, scale, dims, unbatched = _validate(
      query, key, value, mask, is_causal, bias, dropout_rate, scale)
  b, t, n, s, k, h, hv = dims
  rq = jax.nn.softmax(query.astype(jnp.float32) * scale, axis=-1)
  kl = key.astype(jnp.float32) * scale
  ok = None if kv_mask is None else kv_mask[:, :, None, None]
  rk = _common.masked_softmax(kl, ok, axis=1)   # fully masked -> zeros
  g = n // k
  return rq.reshape(b, t, k, g, h), rk, value.astype(jnp.float32), dims, unbatched


# Positions per loop step. Whole-sequence passes (the softmax over S of the
# keys, the [S, K, H] x [S, K, Hv] contraction, rho_q and its product) fall
# out of cache as S grows (CPU time per element doubled from S=4096 to
# 16384 on a 32 MiB-L3 CPU, issue 22); groups of this many positions stay
# in cache, so time is linear in length.
_TOKENS_PER_STEP = 512


def _context(key, value, kv_mask, scale, step):
  """rho_k(K)^T V [B, K, H, Hv] (float32) by one pass over groups of keys:
  an online softmax over positions per key channel (running maximum m, sum
  l, and context acc, rescaled when m grows). Only these small values are
  carried; channels with no valid key give zeros."""
  b, s, k, h = key.shape
  hv = value.shape[-1]
  valid = jnp.arange(_common.round_up(s, step)) < s
  if kv_mask is not None:
    valid = valid[None] & jnp.pad(kv_mask, ((0, 0), (0, valid.shape[0] - s)))
  valid = jnp.broadcast_to(valid, (b, valid.shape[-1]))
  neg = _common.NEG

  def step_fn(carry, xs):
    m, l, acc = carry                               # [b,k,h] x2, [b,k,h,hv]
    kg, vg, ok = xs
    okb = ok[:, :, None, None]
    x = jnp.where(okb, kg.astype(jnp.float32) * scale, neg)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(x, axis=1)))
    has = m_new > 0.5 * neg                         # a valid key seen so far
    had = m > 0.5 * neg
    shrink = jnp.where(had, jnp.exp(jnp.where(had, m - m_new, 0.0)), 0.0)
    base = jnp.where(has, m_new, 0.0)[:, None]
    p = jnp.where(okb, jnp.exp(jnp.where(okb, x - base, 0.0)), 0.0)
    l = l * shrink + jnp.sum(p, axis=1)
    acc = acc * shrink[..., None] + jnp.einsum(
        "blkh,blkd->bkhd", p, vg.astype(jnp.float32))
    return (m_new, l, acc), None

  init = (jnp.full((b, k, h), neg, jnp.float32),
          jnp.zeros((b, k, h), jnp.float32),
          jnp.zeros((b, k, h, hv), jnp.float32))
  # jax.checkpoint: the backward pass recomputes a group's exponentials from
  # its inputs instead of storing them for every group (fwd+bwd CPU time
  # -23% at S=16384 in one A/B run).
  (_, l, acc), _ = jax.lax.scan(
      jax.checkpoint(step_fn), init,
      (to_groups(key, step), to_groups(value, step),
       to_groups(valid, step)))
  ok = l > 0
  return jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)


def efficient_attention(query, key, value, *, mask=None, is_causal: bool = False,
                        scale: Optional[float] = None, bias=None,
                        dropout_rate: float = 0.0, dropout_rng=None):
  """Efficient attention of Shen et al.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H], N % K == 0;
      value: [B, S, K, Hv].
    mask: optional key-padding mask broadcastable to [B, 1, 1, S]; masked keys
      are left out of the per-channel softmax (no keys at all -> zeros).
    is_causal: must be False (NotImplementedError: see the module docstring).
    scale: temperature applied to queries and keys before both softmaxes;
      default 1 (the paper's form).
    bias, dropout_rate: accepted for MultiHeadAttention; must be None/0.

  Returns:
    [B, T, N, Hv] in query.dtype.

  Computed in groups of `_TOKENS_PER_STEP` positions: one loop over key
  groups forms the context with an online softmax over positions, a second
  maps each query group through it (cost and memory traffic linear in T + S).
  """
  del dropout_rng
  query, key, value, kv_mask, scale, dims, unbatched = _validate(
      query, key, value, mask, is_causal, bias, dropout_rate, scale)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  b, t, n, s, k, h, hv = dims
  g = n // k
  context = _context(key, value, kv_mask, scale,
                     min(_TOKENS_PER_STEP, s))       # [b, k, h, hv]
  step = min(_TOKENS_PER_STEP, t)

  def write(_, qg):
    rq = jax.nn.softmax(qg.astype(jnp.float32) * scale, axis=-1)
    out = jnp.einsum("blkgh,bkhd->blkgd", rq.reshape(b, step, k, g, h),
                     context)
    return None, out.reshape(b, step, n, hv).astype(query.dtype)

  _, out = jax.lax.scan(jax.checkpoint(write), None, to_groups(query, step))
  out = jnp.moveaxis(out, 0, 1).reshape(b, _common.round_up(t, step), n,
                                           hv)[:, :t]
  return out[0] if unbatched else out


def efficient_attention_reference(query, key, value, *, mask=None,
                                  is_causal: bool = False,
                                  scale: Optional[float] = None):
  """Quadratic "dot-product" form (rho_q(Q) rho_k(K)^T) V."""
  rq, rk, v, dims, unbatched = _prepare(query, key, value, mask, is_causal,
                                        None, 0.0, scale)
  b, t, n, s, k, h, hv = dims
  weights = jnp.einsum("btkgh,bskh->bkgts", rq, rk)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v)
  out = out.reshape(b, t, n, hv).astype(query.dtype)
  return out[0] if unbatched else out
