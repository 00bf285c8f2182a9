"""Linear (kernelized) attention: Katharopoulos et al. 2020, chunk-wise causal
form of Lightning Attention-2 (Qin et al. 2024).

With a feature map phi applied to queries and keys,

  out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)

(normalize=True), or `scale * sum_j (phi(q_i) . phi(k_j)) v_j` without the
denominator (normalize=False: the unnormalized "linear transformer" form; with
feature_map="identity" this is softmax-free linear self-attention
`scale * (q k^T) v`). Associativity gives `phi(q_i) (sum_j phi(k_j)^T v_j)`,
so non-causal cost is O(S F Hv + T F Hv): linear in sequence length.

Causal (query i sees keys j <= i, top-left aligned as `jax.nn`): the sequence
is cut into chunks of `chunk_size`; inside a chunk the masked quadratic form
`(phi(Q_c) phi(K_c)^T * tril) V_c` is used, across chunks a recurrent state
`S_c = sum_{chunks < c} phi(K)^T V` (an exclusive prefix sum over chunk
states). Cost O(L (C + F) F Hv) with L the padded length: linear in L.
`linear_attention_reference` is the obviously-correct cumulative-sum form.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.sequence import _common

FeatureMap = Union[str, Callable[[jax.Array], jax.Array]]

FEATURE_MAPS = {
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}

DEFAULT_CHUNK_SIZE = 64

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}


def resolve_feature_map(feature_map: FeatureMap) -> Callable:
  if callable(feature_map):
    return feature_map
  if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
    return FEATURE_MAPS[feature_map]
  raise ValueError(
      f"`feature_map` must be one of {sorted(FEATURE_MAPS)} or a callable, got "
      f"{feature_map!r}.")


def _features(query, key, feature_map, kv_mask):
  """float32 phi(q) [B,T,N,F], phi(k) [B,S,K,F] (masked keys zeroed)."""
  phi = resolve_feature_map(feature_map)
  fq = phi(query.astype(jnp.float32)).astype(jnp.float32)
  fk = phi(key.astype(jnp.float32)).astype(jnp.float32)
  if fq.shape[:-1] != query.shape[:-1] or fk.shape[:-1] != key.shape[:-1]:
    raise ValueError(
        "`feature_map` must act on the last axis only: it mapped query "
        f"{query.shape} -> {fq.shape} and key {key.shape} -> {fk.shape}.")
  if fq.shape[-1] != fk.shape[-1]:
    raise ValueError(
        "`feature_map` must give queries and keys the same feature size, got "
        f"{fq.shape[-1]} and {fk.shape[-1]}.")
  if kv_mask is not None:
    fk = jnp.where(kv_mask[:, :, None, None], fk, 0.0)
  return fq, fk


def _finish(num, den, normalize, scale, dtype):
  if normalize:
    ok = den != 0
    out = jnp.where(ok[..., None], num / jnp.where(ok, den, 1.0)[..., None], 0.0)
  else:
    out = num * scale
  return out.astype(dtype)


def _validate(query, key, value, mask, chunk_size, is_causal, bias,
              dropout_rate):
  _common.reject("bias", bias, "linear_attention",
                 "an additive bias on the scores does not factor through the "
                 "feature map.")
  _common.reject("dropout_rate", dropout_rate, "linear_attention",
                 "the attention weights are never materialized.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="linear_attention",
                                     unbatched=unbatched)
  if chunk_size is not None:
    _common.check_positive_int("chunk_size", chunk_size)
  return query, key, value, dims, unbatched, kv_mask


def linear_attention(query, key, value, *, feature_map: FeatureMap = "elu_plus_one",
                     is_causal: bool = False, normalize: bool = True,
                     scale: Optional[float] = None,
                     chunk_size: Optional[int] = None, mask=None, bias=None,
                     dropout_rate: float = 0.0, dropout_rng=None):
  """Kernelized linear attention.

  Args:
    query: [B, T, N, H] (or unbatched [T, N, H]).
    key: [B, S, K, H] with N % K == 0 (grouped-query heads share a state).
    value: [B, S, K, Hv].
    feature_map: "elu_plus_one" (default), "relu", "identity", or a callable
      mapping [..., H] -> [..., F] (applied in float32 to queries and keys).
    is_causal: query i sees keys j <= i (top-left aligned).
    normalize: divide by sum_j phi(q_i).phi(k_j) (rows where it is 0 give 0).
      False gives the unnormalized form `scale * phi(Q) phi(K)^T V`.
    scale: multiplies the scores phi(q).phi(k); default 1. It cancels when
      normalize=True.
    chunk_size: chunk length of the causal chunk-wise form (default 64);
      ignored when not causal (the non-causal form needs no chunking).
    mask: optional key-padding mask, bool broadcastable to [B, 1, 1, S]
      (True = attend). Query-dependent masks raise NotImplementedError.
    bias, dropout_rate: accepted for `MultiHeadAttention` compatibility;
      anything but None/0 raises NotImplementedError.

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, key, value, dims, unbatched, kv_mask = _validate(
      query, key, value, mask, chunk_size, is_causal, bias, dropout_rate)
  b, t, n, s, k, h, hv = dims
  g = n // k
  scale = 1.0 if scale is None else float(scale)
  fq, fk = _features(query, key, feature_map, kv_mask)
  f = fq.shape[-1]
  fq = fq.reshape(b, t, k, g, f)
  v = value.astype(jnp.float32)
  if not is_causal:
    kv = jnp.einsum("bskf,bskd->bkfd", fk, v)
    num = jnp.einsum("btkgf,bkfd->btkgd", fq, kv)
    den = jnp.einsum("btkgf,bkf->btkg", fq, jnp.sum(fk, axis=1))
  else:
    num, den = _causal_chunked(fq, fk, v, chunk_size or DEFAULT_CHUNK_SIZE)
  out = _finish(num, den, normalize, scale, query.dtype).reshape(b, t, n, hv)
  return out[0] if unbatched else out


def _causal_chunked(fq, fk, v, chunk_size):
  """Chunk-wise causal numerator [B,T,K,G,Hv] and denominator [B,T,K,G]."""
  b, t, k, g, f = fq.shape
  s, hv = fk.shape[1], v.shape[-1]
  c = min(chunk_size, max(t, s))
  length = _common.round_up(max(t, s), c)
  nc = length // c
  # Padded keys have zero features, so they contribute nothing; padded query
  # rows are cropped. Keys past the last query are never seen.
  fq = jnp.pad(fq, ((0, 0), (0, length - t), (0, 0), (0, 0), (0, 0)))
  fk = jnp.pad(fk[:, :length], ((0, 0), (0, length - min(s, length)), (0, 0), (0, 0)))
  v = jnp.pad(v[:, :length], ((0, 0), (0, length - min(s, length)), (0, 0), (0, 0)))
  fq = fq.reshape(b, nc, c, k, g, f)
  fk = fk.reshape(b, nc, c, k, f)
  v = v.reshape(b, nc, c, k, hv)
  # Intra-chunk: masked quadratic form.
  scores = jnp.einsum("bcikgf,bcjkf->bckgij", fq, fk)
  tril = jnp.tril(jnp.ones((c, c), dtype=bool))
  scores = jnp.where(tril, scores, 0.0)
  num = jnp.einsum("bckgij,bcjkd->bcikgd", scores, v)
  den = jnp.einsum("bckgij->bcikg", scores)
  # Inter-chunk: exclusive prefix sums of the chunk states.
  kv = jnp.einsum("bcjkf,bcjkd->bckfd", fk, v)
  z = jnp.sum(fk, axis=2)                                # [b, nc, k, f]
  kv_prev = jnp.cumsum(kv, axis=1) - kv
  z_prev = jnp.cumsum(z, axis=1) - z
  num = num + jnp.einsum("bcikgf,bckfd->bcikgd", fq, kv_prev)
  den = den + jnp.einsum("bcikgf,bckf->bcikg", fq, z_prev)
  num = num.reshape(b, length, k, g, hv)[:, :t]
  den = den.reshape(b, length, k, g)[:, :t]
  return num, den


def linear_attention_reference(query, key, value, *,
                               feature_map: FeatureMap = "elu_plus_one",
                               is_causal: bool = False, normalize: bool = True,
                               scale: Optional[float] = None, mask=None):
  """Plain-jnp reference: causal form by cumulative sums of phi(k_j) v_j^T.

  Materializes the per-position state [B, S, K, F, Hv]: use for small tests.
  """
  query, key, value, dims, unbatched, kv_mask = _validate(
      query, key, value, mask, None, is_causal, None, 0.0)
  b, t, n, s, k, h, hv = dims
  g = n // k
  scale = 1.0 if scale is None else float(scale)
  fq, fk = _features(query, key, feature_map, kv_mask)
  f = fq.shape[-1]
  fq = fq.reshape(b, t, k, g, f)
  v = value.astype(jnp.float32)
  outer = fk[..., :, None] * v[..., None, :]            # [b, s, k, f, hv]
  if is_causal:
    states = jnp.cumsum(outer, axis=1)
    zs = jnp.cumsum(fk, axis=1)
    idx = jnp.minimum(jnp.arange(t), s - 1)             # last key seen by i
    states, zs = states[:, idx], zs[:, idx]             # [b, t, k, f, hv]
  else:
    states = jnp.broadcast_to(jnp.sum(outer, axis=1, keepdims=True),
                              (b, t, k, f, hv))
    zs = jnp.broadcast_to(jnp.sum(fk, axis=1, keepdims=True), (b, t, k, f))
  num = jnp.einsum("btkgf,btkfd->btkgd", fq, states)
  den = jnp.einsum("btkgf,btkf->btkg", fq, zs)
  out = _finish(num, den, normalize, scale, query.dtype).reshape(b, t, n, hv)
  return out[0] if unbatched else out
