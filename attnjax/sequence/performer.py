"""Performer FAVOR+ (Choromanski et al. 2021): softmax attention approximated
by positive orthogonal random features, computed as linear attention.

With x = sqrt(scale) q (so x_q . x_k = scale q . k) and rows w_1..w_F of the
projection,

  phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(F),   E[phi(x_q) . phi(x_k)] = exp(x_q . x_k)

for w_i ~ N(0, I); FAVOR+ uses orthogonal blocks of w (rows of a random
orthogonal matrix, rescaled by chi(H)-distributed norms), which keeps the
estimator unbiased and lowers its variance. The output is normalized linear
attention on these features, so its cost is linear in sequence length and the
causal form is the chunk-wise one of `linear_attention`. Stabilizers (a
per-query-row max and a per-(batch, head) key max, both cancelling in the
normalization) keep the exponentials finite.

Redraw: the projection is an explicit argument; draw a new one with
`orthogonal_random_features(rng, ...)` (the NNX layer has `redraw(rng)`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.sequence import _common
from attnjax.sequence.linear import linear_attention

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}


def orthogonal_random_features(rng, num_features: int, head_dim: int, *,
                               orthogonal: bool = True) -> jax.Array:
  """[num_features, head_dim] float32 projection for FAVOR+.

  orthogonal=True: stacked blocks of orthonormal rows (QR of Gaussian
  matrices), each row rescaled by the norm of an independent N(0, I_H) vector
  so rows have the marginal law of Gaussian rows. False: i.i.d. N(0, 1).
  """
  _common.check_positive_int("num_features", num_features)
  _common.check_positive_int("head_dim", head_dim)
  k_blocks, k_norms = jax.random.split(rng)
  if not orthogonal:
    return jax.random.normal(k_blocks, (num_features, head_dim), jnp.float32)
  nblocks = -(-num_features // head_dim)
  g = jax.random.normal(k_blocks, (nblocks, head_dim, head_dim), jnp.float32)
  qmat, _ = jnp.linalg.qr(g)                         # columns orthonormal
  rows = jnp.swapaxes(qmat, -1, -2).reshape(nblocks * head_dim, head_dim)
  rows = rows[:num_features]
  norms = jnp.linalg.norm(
      jax.random.normal(k_norms, (num_features, head_dim), jnp.float32), axis=-1)
  return rows * norms[:, None]


def _check_projection(projection, h):
  projection = jnp.asarray(projection)
  if projection.ndim != 2 or projection.shape[1] != h:
    raise ValueError(
        f"`projection` must have shape [num_features, head_dim={h}], got "
        f"{projection.shape}.")
  return projection.astype(jnp.float32)


def favor_features(x, projection, *, is_query: bool, kv_mask=None):
  """Positive random features [..., F] of x [B, L, heads, H] (float32).

  Query features are stabilized per row, key features by one max per
  (batch, head) over valid positions; both factors cancel in normalized
  attention.
  """
  x = x.astype(jnp.float32)
  wx = jnp.einsum("blnh,fh->blnf", x, projection)
  sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  logits = wx - sq
  if is_query:
    stab = jnp.max(logits, axis=-1, keepdims=True)
  else:
    masked = logits
    if kv_mask is not None:
      masked = jnp.where(kv_mask[:, :, None, None], logits, -jnp.inf)
    stab = jnp.max(masked, axis=(1, 3), keepdims=True)
    stab = jnp.where(jnp.isfinite(stab), stab, 0.0)
  stab = jax.lax.stop_gradient(stab)
  return jnp.exp(logits - stab) / math.sqrt(projection.shape[0])


def _prepare(query, key, value, projection, mask, scale, bias, dropout_rate):
  _common.reject("bias", bias, "performer_attention",
                 "an additive score bias does not factor through the features.")
  _common.reject("dropout_rate", dropout_rate, "performer_attention",
                 "the attention weights are never materialized.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  if projection is None:
    raise ValueError(
        "`projection` is required: draw one with "
        "orthogonal_random_features(rng, num_features, head_dim).")
  projection = _check_projection(projection, h)
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="performer_attention",
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  root = math.sqrt(_common.default_scale(scale, h))
  fq = favor_features(query * root, projection, is_query=True)
  fk = favor_features(key * root, projection, is_query=False, kv_mask=kv_mask)
  return query, fq, fk, value, kv_mask, unbatched


def performer_attention(query, key, value, projection, *, is_causal: bool = False,
                        scale: Optional[float] = None,
                        chunk_size: Optional[int] = None, mask=None, bias=None,
                        dropout_rate: float = 0.0, dropout_rng=None):
  """FAVOR+ approximation of softmax(scale q k^T) v.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value: [B, S, K, Hv].
    projection: [F, H] random features (`orthogonal_random_features`).
    is_causal: prefix-sum (chunk-wise) form, query i sees keys j <= i.
    scale: softmax temperature being approximated; default 1/sqrt(H).
    chunk_size: chunk length of the causal form (see linear_attention).
    mask: key-padding mask broadcastable to [B, 1, 1, S].

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, fq, fk, value, kv_mask, unbatched = _prepare(
      query, key, value, projection, mask, scale, bias, dropout_rate)
  out = linear_attention(
      fq, fk, value, feature_map="identity", normalize=True,
      is_causal=is_causal, chunk_size=chunk_size,
      mask=None if kv_mask is None else kv_mask[:, None, None, :])
  out = out.astype(query.dtype)
  return out[0] if unbatched else out


def performer_attention_reference(query, key, value, projection, *,
                                  is_causal: bool = False,
                                  scale: Optional[float] = None, mask=None):
  """Quadratic form of the same estimator: phi(Q) phi(K)^T, masked, normalized."""
  query, fq, fk, value, kv_mask, unbatched = _prepare(
      query, key, value, projection, mask, scale, None, 0.0)
  b, t, n, f = fq.shape
  s, k = fk.shape[1], fk.shape[2]
  fk = jnp.repeat(fk, n // k, axis=2)
  v = jnp.repeat(value.astype(jnp.float32), n // k, axis=2)
  w = jnp.einsum("btnf,bsnf->bnts", fq, fk)
  allow = jnp.ones((b, 1, t, s), bool)
  if is_causal:
    allow = allow & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  if kv_mask is not None:
    allow = allow & kv_mask[:, None, None, :]
  w = jnp.where(allow, w, 0.0)
  den = jnp.sum(w, -1, keepdims=True)
  w = jnp.where(den > 0, w / jnp.where(den > 0, den, 1.0), 0.0)
  out = jnp.einsum("bnts,bsnd->btnd", w, v).astype(query.dtype)
  return out[0] if unbatched else out
