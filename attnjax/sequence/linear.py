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
_TOKENS_PER_STEP = 512

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
  v = value.astype(jnp.float32)
  if not is_causal:
    # Head-major layout (contiguous per head) and, when normalizing, a ones
    # column on the values so numerator and denominator come from one product.
    fqh = fq.reshape(b, t, k, g, f).transpose(0, 2, 3, 1, 4)  # [b,k,g,t,f]
    fkh = fk.transpose(0, 2, 1, 3)                            # [b,k,s,f]
    vh = v.transpose(0, 2, 1, 3)                              # [b,k,s,hv]
    if normalize:
      vh = jnp.concatenate([vh, jnp.ones(vh.shape[:-1] + (1,), vh.dtype)], -1)
    kv = jnp.einsum("bksf,bksd->bkfd", fkh, vh)
    nd = jnp.einsum("bkgtf,bkfd->btkgd", fqh, kv)
    num, den = (nd[..., :-1], nd[..., -1]) if normalize else (nd, None)
  else:
    num, den = _causal_chunked(fq.reshape(b, t, k, g, f), fk, v,
                               chunk_size or DEFAULT_CHUNK_SIZE, normalize)
  out = _finish(num, den, normalize, scale, query.dtype).reshape(b, t, n, hv)
  return out[0] if unbatched else out


def _causal_chunked(fq, fk, v, chunk_size, normalize):
  """Chunk-wise causal numerator [B,T,K,G,D] and denominator [B,T,K,G] (or
  None) of fq [B,T,K,G,F], fk [B,S,K,F], v [B,S,K,D].

  A lax.scan walks over groups of chunks (about _TOKENS_PER_STEP tokens per
  step, so a step's working set stays in cache) carrying the state
  sum phi(K)^T V (and sum phi(K)) of all earlier chunks; inside a step the
  chunks are handled in parallel: intra-chunk masked quadratic form plus an
  exclusive prefix sum of the chunk states.
  """
  b, t, k, g, f = fq.shape
  s, d = fk.shape[1], v.shape[-1]
  c = min(chunk_size, max(t, s))
  per_step = max(1, min(_TOKENS_PER_STEP // c, -(-max(t, s) // c)))
  length = _common.round_up(max(t, s), c * per_step)
  n = length // (c * per_step)
  # Padded keys have zero features and values, so they contribute nothing;
  # padded query rows are cropped. Keys past the padded length are never seen.
  sk = min(s, length)
  fq = jnp.pad(fq, ((0, 0), (0, length - t), (0, 0), (0, 0), (0, 0)))
  fk = jnp.pad(fk[:, :length], ((0, 0), (0, length - sk), (0, 0), (0, 0)))
  v = jnp.pad(v[:, :length], ((0, 0), (0, length - sk), (0, 0), (0, 0)))
  # Step-major: [n, b, P, c, ...] (one copy each).
  fq = jnp.moveaxis(fq.reshape(b, n, per_step, c, k, g, f), 1, 0)
  fk = jnp.moveaxis(fk.reshape(b, n, per_step, c, k, f), 1, 0)
  v = jnp.moveaxis(v.reshape(b, n, per_step, c, k, d), 1, 0)
  tril = jnp.tril(jnp.ones((c, c), dtype=bool))

  def step(carry, xs):
    kv_state, z_state = carry          # [b,k,f,d], [b,k,f]
    q_, k_, v_ = xs                    # [b,P,c,k,g,f], [b,P,c,k,f], [b,P,c,k,d]
    scores = jnp.einsum("bpikgf,bpjkf->bpkgij", q_, k_)
    scores = jnp.where(tril, scores, 0.0)
    num = jnp.einsum("bpkgij,bpjkd->bpikgd", scores, v_)
    kv = jnp.einsum("bpjkf,bpjkd->bpkfd", k_, v_)
    prev = kv_state[:, None] + jnp.cumsum(kv, axis=1) - kv
    num = num + jnp.einsum("bpikgf,bpkfd->bpikgd", q_, prev)
    if normalize:
      den = jnp.sum(scores, axis=-1).transpose(0, 1, 4, 2, 3)   # [b,P,i,k,g]
      z = jnp.sum(k_, axis=2)                                   # [b,P,k,f]
      zprev = z_state[:, None] + jnp.cumsum(z, axis=1) - z
      den = den + jnp.einsum("bpikgf,bpkf->bpikg", q_, zprev)
      z_state = z_state + jnp.sum(z, axis=1)
    else:
      den = jnp.zeros((), jnp.float32)
    return (kv_state + jnp.sum(kv, axis=1), z_state), (num, den)

  carry = (jnp.zeros((b, k, f, d), jnp.float32),
           jnp.zeros((b, k, f), jnp.float32))
  _, (num, den) = jax.lax.scan(step, carry, (fq, fk, v))
  num = jnp.moveaxis(num, 0, 1).reshape(b, length, k, g, d)[:, :t]
  if not normalize:
    return num, None
  den = jnp.moveaxis(den, 0, 1).reshape(b, length, k, g)[:, :t]
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
