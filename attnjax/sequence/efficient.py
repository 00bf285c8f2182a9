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


def _prepare(query, key, value, mask, is_causal, bias, dropout_rate, scale):
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
  rq = jax.nn.softmax(query.astype(jnp.float32) * scale, axis=-1)
  kl = key.astype(jnp.float32) * scale
  ok = None if kv_mask is None else kv_mask[:, :, None, None]
  rk = _common.masked_softmax(kl, ok, axis=1)   # fully masked -> zeros
  g = n // k
  return rq.reshape(b, t, k, g, h), rk, value.astype(jnp.float32), dims, unbatched


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
  """
  del dropout_rng
  rq, rk, v, dims, unbatched = _prepare(query, key, value, mask, is_causal,
                                        bias, dropout_rate, scale)
  b, t, n, s, k, h, hv = dims
  context = jnp.einsum("bskh,bskd->bkhd", rk, v)
  out = jnp.einsum("btkgh,bkhd->btkgd", rq, context)
  out = out.reshape(b, t, n, hv).astype(query.dtype)
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
