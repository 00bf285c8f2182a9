"""Bi-level routing attention (BiFormer, Zhu et al. 2023), 1D sequences.

Queries and keys are cut into regions of `region_size`. Region-level queries
and keys are the means over each region; the region affinity
A = Q_r K_r^T (summed over heads: BiFormer routes with the full channel
dimension, shared by all heads) selects for each query region its `top_k`
key regions; every token of the query region then does softmax attention
over the tokens of those regions. Cost O(T top_k region_size H) plus the
routing O((T/r)(S/r) H).

Causal: key regions starting after a query region's last position are
excluded, the query region's own region is always selected (so every query
sees at least itself) and causal masking applies at token level.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax.sequence import _common
from attnjax.sequence._gather import gathered_attention
from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}


def _region_mean(x, r, valid):
  """x [B, L, heads, H], valid [B, L] -> [B, L/r, heads, H] (float32)."""
  b, l, nh, h = x.shape
  nr = -(-l // r)
  lp = nr * r
  w = jnp.pad(valid.astype(jnp.float32), ((0, 0), (0, lp - l))).reshape(b, nr, r)
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, lp - l), (0, 0), (0, 0)))
  xp = xp.reshape(b, nr, r, nh, h)
  cnt = jnp.sum(w, -1)
  return (jnp.einsum("bcj,bcjnh->bcnh", w, xp) /
          jnp.maximum(cnt, 1.0)[..., None, None]), cnt


def routing_scores(query, key, region_size: int, *, is_causal: bool,
                   kv_mask=None):
  """Region affinity [B, nq_regions, nk_regions]; excluded / forced regions
  hold the finite sentinels _common.NEG / POS."""
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  qvalid = jnp.ones((b, t), bool)
  kvalid = jnp.ones((b, s), bool) if kv_mask is None else kv_mask
  qr, _ = _region_mean(query, region_size, qvalid)
  kr, kcnt = _region_mean(key, region_size, kvalid)
  nqr, nkr = qr.shape[1], kr.shape[1]
  qr = qr.reshape(b, nqr, k, n // k, h)
  a = jnp.einsum("bakgh,bckh->bac", qr, kr)
  allowed = (kcnt > 0)[:, None, :]
  qa = jnp.arange(nqr)[:, None]
  kc = jnp.arange(nkr)[None, :]
  if is_causal:
    last = jnp.minimum(qa * region_size + region_size - 1, t - 1)
    allowed = allowed & (kc * region_size <= last)
    a = jnp.where(allowed, a, _common.NEG)
    a = jnp.where((kc == qa) & (kcnt > 0)[:, None, :], _common.POS, a)
  else:
    a = jnp.where(allowed, a, _common.NEG)
  return a


def _check(query, key, value, mask, region_size, top_k, bias, dropout_rate):
  _common.reject("bias", bias, "routing_attention",
                 "only the routed key regions are gathered.")
  _common.reject("dropout_rate", dropout_rate, "routing_attention",
                 "attention dropout is not implemented for gathered blocks.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  region_size = _common.check_positive_int("region_size", region_size)
  top_k = _common.check_positive_int("top_k", top_k)
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="routing_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  return query, key, value, dims, unbatched, kv_mask, region_size, top_k


def routing_attention(query, key, value, *, region_size: int = 64,
                      top_k: int = 4, is_causal: bool = False,
                      scale: Optional[float] = None, mask=None, bias=None,
                      dropout_rate: float = 0.0, dropout_rng=None):
  """Bi-level routing attention on 1D sequences.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value [B, S, K, Hv].
    region_size: tokens per region (query and key side).
    top_k: key regions routed to each query region (capped at their count).
    is_causal: see the module docstring.
    scale: default 1/sqrt(H).
    mask: key-padding mask broadcastable to [B, 1, 1, S].

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, key, value, dims, unbatched, kv_mask, region_size, top_k = _check(
      query, key, value, mask, region_size, top_k, bias, dropout_rate)
  b, t, n, s, k, h, hv = dims
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  a = jax.lax.stop_gradient(routing_scores(query, key, region_size,
                                           is_causal=is_causal, kv_mask=kv_mask))
  vals, idx = jax.lax.top_k(a, min(top_k, a.shape[-1]))
  out = gathered_attention(
      query, key, value, idx[:, None], (vals > 0.5 * _common.NEG)[:, None],
      block_q=region_size, block_k=region_size,
      scale=_common.default_scale(scale, h), is_causal=is_causal,
      kv_mask=kv_mask)
  return out[0] if unbatched else out


def routing_attention_reference(query, key, value, *, region_size: int = 64,
                                top_k: int = 4, is_causal: bool = False,
                                scale: Optional[float] = None, mask=None):
  """Dense softmax attention with the routed regions expanded to a mask."""
  query, key, value, dims, unbatched, kv_mask, region_size, top_k = _check(
      query, key, value, mask, region_size, top_k, None, 0.0)
  b, t, n, s, k, h, hv = dims
  a = routing_scores(query, key, region_size, is_causal=is_causal,
                     kv_mask=kv_mask)
  rank = jnp.argsort(jnp.argsort(-a, axis=-1, stable=True), axis=-1)
  sel = (rank < top_k) & (a > 0.5 * _common.NEG)                  # [b, nqr, nkr]
  dense = jnp.repeat(jnp.repeat(sel, region_size, 1), region_size, 2)
  dense = dense[:, None, :t, :s]
  out = dot_product_attention(query, key, value,
                              mask=masks_lib.and_masks(dense, mask),
                              scale=scale, is_causal=is_causal,
                              implementation="xla")
  return out[0] if unbatched else out
