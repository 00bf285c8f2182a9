"""Performer FAVOR+ (Choromanski et al. 2021): softmax attention approximated
by positive orthogonal random features, computed as linear attention.

With x = sqrt(scale) q (so x_q . x_k = scale q . k) and rows w_1..w_F of the
projection,

  phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(F),   E[phi(x_q) . phi(x_k)] = exp(x_q . x_k)

for w_i ~ N(0, I); FAVOR+ uses orthogonal blocks of w (rows of a random
orthogonal matrix, rescaled by chi(H)-distributed norms), which keeps the
estimator unbiased and lowers its variance.

Numerics. The features are exponentials of w . x - |x|^2 / 2, which at large
input scales span hundreds of orders of magnitude; FAVOR+'s stabilizers
(per-query-row max, one key max per batch and head) still let a whole row
underflow (rows of exact zeros, NaN gradients of num / den). Here the shifts
are chosen so that the largest term of every normalizer is exactly 1:
non-causal, one key max per feature (b_f) and the query shift
a_i = max_f (lq_if + b_f), then unnormalized linear attention on [v, 1],
in groups of positions (one loop over keys keeping a running per-feature
max, one over queries) so the [L, N, F] exponents never exist whole;
causal, a chunked scan with a running per-feature key max and the in-chunk
pair weights exp(logsumexp_f(lq_if + lk_jf) - a_i) (cost O(T chunk F) per
head, linear in length). All shifts cancel exactly in num / den.
`performer_attention_reference` evaluates the same estimator quadratically
in log space (logsumexp over features), independent of these shifts.

Redraw: the projection is an explicit argument; draw a new one with
`orthogonal_random_features(rng, ...)` (the NNX layer has `redraw(rng)`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.sequence import _common
from attnjax.sequence._common import to_groups

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
      masked = jnp.where(kv_mask[:, :, None, None], logits, _common.NEG)
    stab = jnp.max(masked, axis=(1, 3), keepdims=True)
    stab = jnp.where(stab > 0.5 * _common.NEG, stab, 0.0)
  stab = jax.lax.stop_gradient(stab)
  return jnp.exp(logits - stab) / math.sqrt(projection.shape[0])


def _exponents(x, projection):
  """w_f . x - |x|^2 / 2: the exponents of the positive features, float32."""
  x = x.astype(jnp.float32)
  wx = jnp.einsum("blnh,fh->blnf", x, projection)
  return wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


# Positions per loop step of the non-causal form. The exponents and features
# of a whole sequence ([L, N, F] float32, 32 MiB at L=16384, 4 heads, F=128)
# fall out of cache, and those whole-sequence passes grew ~L^1.2 in CPU
# time (issue 22); per group of this many positions they stay in cache.
_TOKENS_PER_STEP = 256


def _noncausal_stable(query, key, value, root, projection, kv_mask, groups,
                      dtype):
  """Non-causal output [B, T, N, Hv] with shifts chosen so that nothing a
  valid row needs underflows; computed in groups of positions.

  Keys: b_f = max over valid key positions of lk[..., f], one per (batch,
  kv head, feature), so each feature's largest key term is exactly 1.
  Queries take the key maxima in: fq = exp(lq_if + b_f - a_i) with
  a_i = max_f (lq_if + b_f), so fq_f fk_sf = exp(lq_if + lk_sf - a_i) and the
  query's dominant feature pairs with a key term equal to 1: the normalizer
  of every query that has a valid key is >= 1. FAVOR+'s per-row query max
  and per-(batch, head) key max (Choromanski et al.) leave both factors free
  to underflow at large input scales (whole rows of zeros and NaN gradients
  of num / den).

  One loop over key groups forms a group's exponents lk and accumulates
  sum_s exp(lk_sf - m_f) [v_s, 1] with m_f the running maximum (the state
  is rescaled when it grows; at the end m = b); a second loop forms each
  query group's exponents and reads the state. Only the [B, K, F] maximum
  and the [B, K, F, Hv + 1] state are carried. All shifts cancel in
  num / den (stop_gradient is exact).
  """
  b, s, k, _ = key.shape
  t, n, hv = query.shape[1], query.shape[2], value.shape[-1]
  f = projection.shape[0]
  low = jnp.finfo(jnp.float32).min      # finite: safe under jax.debug_infs
  step_k = min(_TOKENS_PER_STEP, s)
  valid = jnp.arange(_common.round_up(s, step_k)) < s
  if kv_mask is not None:
    valid = valid[None] & jnp.pad(kv_mask, ((0, 0), (0, valid.shape[0] - s)))
  valid = jnp.broadcast_to(valid, (b, valid.shape[-1]))

  def key_step(carry, xs):
    m, acc = carry                                  # [b,k,f], [b,k,f,d]
    kg, vg, ok = xs
    okb = ok[:, :, None, None]
    lk = jnp.where(okb, _exponents(kg * root, projection), low)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(lk, axis=1)))
    had = m > 0.5 * low
    shrink = jnp.where(had, jnp.exp(jnp.where(had, m - m_new, 0.0)), 0.0)
    base = jnp.where(m_new > 0.5 * low, m_new, 0.0)[:, None]
    fk = jnp.where(okb, jnp.exp(jnp.where(okb, lk - base, 0.0)), 0.0)
    v1 = jnp.concatenate([vg.astype(jnp.float32),
                          jnp.ones(vg.shape[:-1] + (1,), jnp.float32)], -1)
    acc = acc * shrink[..., None] + jnp.einsum("blkf,blkd->bkfd", fk, v1)
    return (m_new, acc), None

  # jax.checkpoint: the backward pass recomputes a group's exponents and
  # features from its inputs instead of storing them for every group (less
  # memory traffic; fwd+bwd CPU time -14% at L=16384 in one A/B run).
  init = (jnp.full((b, k, f), low, jnp.float32),
          jnp.zeros((b, k, f, hv + 1), jnp.float32))
  (m, acc), _ = jax.lax.scan(jax.checkpoint(key_step), init,
                             (to_groups(key, step_k), to_groups(value, step_k),
                              to_groups(valid, step_k)))
  bk = jnp.where(m > 0.5 * low, m, 0.0)                       # [b,k,f]
  step_q = min(_TOKENS_PER_STEP, t)

  def query_step(_, qg):
    lq = _exponents(qg * root, projection).reshape(b, step_q, k, groups, f)
    lq = lq + bk[:, None, :, None]
    aq = jax.lax.stop_gradient(jnp.max(lq, axis=-1, keepdims=True))
    nd = jnp.einsum("blkgf,bkfd->blkgd", jnp.exp(lq - aq), acc)
    num, den = nd[..., :-1], nd[..., -1:]
    ok = den > _TINY_DEN
    out = jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)
    return None, out.reshape(b, step_q, n, hv).astype(dtype)

  _, out = jax.lax.scan(jax.checkpoint(query_step), None,
                        to_groups(query, step_q))
  out = jnp.moveaxis(out, 0, 1).reshape(b, _common.round_up(t, step_q), n, hv)
  return out[:, :t]


def _checked(query, key, value, projection, mask, scale, bias, dropout_rate):
  """Validated inputs (masked key/value slots zeroed), the float32
  projection and sqrt(scale)."""
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
  return query, key, value, projection, root, kv_mask, unbatched, dims


def _prepare(query, key, value, projection, mask, scale, bias, dropout_rate):
  """As _checked, with the whole-sequence exponents lq, lk (causal form and
  reference)."""
  query, key, value, projection, root, kv_mask, unbatched, dims = _checked(
      query, key, value, projection, mask, scale, bias, dropout_rate)
  lq = _exponents(query * root, projection)
  lk = _exponents(key * root, projection)
  return query, lq, lk, value, kv_mask, unbatched, dims


def _causal_stable(lq, lk, v1, kv_mask, groups, chunk):
  """Causal num/den [B, T, N, D] with a running per-feature key maximum.

  Chunks of `chunk` positions: inside a chunk, pair weights
  exp(logsumexp_f(lq_if + lk_jf) - a_i) (j <= i); across chunks, the state
  sum_j exp(lk_jf - m_f) v_j with m_f the running maximum of the earlier
  chunks (rescaled when it grows), read by exp(lq_if + m_f - a_i). a_i is the
  largest of those exponents, so the term reaching it is exactly 1 and every
  query with a valid earlier key has normalizer >= 1 whatever the input
  scale. All shifts cancel in num / den (stop_gradient is exact).
  """
  b, t, n, f = lq.shape
  s, d = lk.shape[1], v1.shape[-1]
  low = jnp.finfo(jnp.float32).min
  c = max(1, min(chunk, max(t, s)))
  length = _common.round_up(max(t, s), c)
  lk = jnp.repeat(lk, groups, axis=2)
  v1 = jnp.repeat(v1, groups, axis=2)
  ok = jnp.arange(length) < s
  if kv_mask is not None:
    ok = ok[None] & jnp.pad(kv_mask, ((0, 0), (0, length - s)))
  ok = jnp.broadcast_to(ok, (b, length))

  def chunks(x):
    x = jnp.pad(x, ((0, 0), (0, length - x.shape[1])) +
                ((0, 0),) * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, length // c, c) + x.shape[2:]), 1, 0)

  tril = jnp.tril(jnp.ones((c, c), bool))

  def step(state, xs):
    m, acc = state                               # [B,N,F], [B,N,F,D]
    qc, kc, vc, okc = xs                         # [B,C,N,F]x2, [B,C,N,D], [B,C]
    kc = jnp.where(okc[:, :, None, None], kc, low)
    pair_ok = tril[None, :, :, None] & okc[:, None, :, None]   # [B,Ci,Cj,1]
    pl = jax.nn.logsumexp(qc[:, :, None] + kc[:, None], axis=-1)  # [B,Ci,Cj,N]
    pl = jnp.where(pair_ok, pl, low)
    has_prev = m > 0.5 * low
    qm = jnp.where(has_prev[:, None], qc + m[:, None], low)    # [B,C,N,F]
    a = jnp.maximum(jnp.max(pl, axis=2), jnp.max(qm, axis=-1))  # [B,C,N]
    a = jax.lax.stop_gradient(jnp.where(a > 0.5 * low, a, 0.0))
    w = jnp.where(pair_ok, jnp.exp(pl - a[:, :, None]), 0.0)
    fq = jnp.where(has_prev[:, None],
                   jnp.exp(qm - a[..., None]), 0.0)
    nd = (jnp.einsum("bijn,bjnd->bind", w, vc) +
          jnp.einsum("binf,bnfd->bind", fq, acc))
    new_m = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(kc, axis=1)))
    has_new = new_m > 0.5 * low
    shrink = jnp.where(has_prev, jnp.exp(m - new_m), 0.0)
    fk = jnp.where(okc[:, :, None, None] & has_new[:, None],
                   jnp.exp(kc - new_m[:, None]), 0.0)
    acc = acc * shrink[..., None] + jnp.einsum("bjnf,bjnd->bnfd", fk, vc)
    return (new_m, acc), nd

  init = (jnp.full((b, n, f), low, jnp.float32),
          jnp.zeros((b, n, f, d), jnp.float32))
  _, nd = jax.lax.scan(step, init, (chunks(lq), chunks(lk), chunks(v1),
                                    chunks(ok)))
  return jnp.moveaxis(nd, 0, 1).reshape(b, length, n, d)[:, :t]


# Chunk length of the causal form (its in-chunk pair term is
# [B, chunk, chunk, N, F]).
_CAUSAL_CHUNK = 32
# Normalizers below this are treated as zero: d(num/den) ~ 1/den^2 must stay
# finite in float32.
_TINY_DEN = 1e-18


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
    chunk_size: chunk length of the causal scan (default 32; its in-chunk
      pair term is [B, chunk, chunk, N, F]).
    mask: key-padding mask broadcastable to [B, 1, 1, S].

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  query, key, value, projection, root, kv_mask, unbatched, dims = _checked(
      query, key, value, projection, mask, scale, bias, dropout_rate)
  if (empty := _common.empty_output(dims, query.dtype, unbatched)) is not None:
    return empty
  b, t, n, s, k, h, hv = dims
  if not is_causal:
    out = _noncausal_stable(query, key, value, root, projection, kv_mask,
                            n // k, query.dtype)
    return out[0] if unbatched else out
  lq = _exponents(query * root, projection)
  lk = _exponents(key * root, projection)
  # [v, 1] gives numerator and normalizer in one pass; the division is
  # guarded here.
  v1 = jnp.concatenate([value.astype(jnp.float32),
                        jnp.ones(value.shape[:-1] + (1,), jnp.float32)], -1)
  nd = _causal_stable(lq, lk, v1, kv_mask, n // k,
                      chunk_size or _CAUSAL_CHUNK)
  num, den = nd[..., :-1], nd[..., -1:]
  ok = den > _TINY_DEN
  out = jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0).astype(query.dtype)
  return out[0] if unbatched else out


def performer_attention_reference(query, key, value, projection, *,
                                  is_causal: bool = False,
                                  scale: Optional[float] = None, mask=None):
  """Quadratic form of the same estimator, in log space.

  Weight of key s for query i: sum_f exp(lq_if + lk_sf), formed as
  exp(logsumexp_f(lq_if + lk_sf)) and normalized by a masked softmax over s,
  so no feature is ever exponentiated on its own (independent of the
  stabilizers of `performer_attention`, exact up to float32 rounding at any
  input scale).
  """
  query, lq, lk, value, kv_mask, unbatched, dims = _prepare(
      query, key, value, projection, mask, scale, None, 0.0)
  b, t, n, s, k, h, hv = dims
  lk = jnp.repeat(lk, n // k, axis=2)
  v = jnp.repeat(value.astype(jnp.float32), n // k, axis=2)
  logw = jax.nn.logsumexp(lq.transpose(0, 2, 1, 3)[:, :, :, None, :] +
                          lk.transpose(0, 2, 1, 3)[:, :, None, :, :], axis=-1)
  allow = jnp.ones((b, 1, t, s), bool)
  if is_causal:
    allow = allow & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  if kv_mask is not None:
    allow = allow & kv_mask[:, None, None, :]
  w = _common.masked_softmax(logw, allow)
  out = jnp.einsum("bnts,bsnd->btnd", w, v).astype(query.dtype)
  return out[0] if unbatched else out
