"""Additive attention (Bahdanau et al. 2015; the soft attention of Show, Attend
and Tell, Xu et al. 2015) and the pointer of Pointer Networks (Vinyals et al.
2015).

With projected queries q_t = W_a s_t and keys k_s = U_a h_s (the layer's
projections; any width D) and a weight vector w per head:

  e_ts     = w . tanh(q_t + k_s)
  alpha_t  = softmax_s(e_ts)          (masked entries excluded)
  out_t    = sum_s alpha_ts v_s       (`additive_attention`)
  p(C_t)   = alpha_t                  (`pointer_attention`: the distribution
                                       over input positions a pointer
                                       network outputs)

There is no 1/sqrt(D) temperature (`scale` multiplies the logits, default 1).
The tanh couples q and k, so the [T, S, D] pre-activation cannot be factored
like a dot product: the cost is O(T S D) and the 'xla' backend processes
`query_chunk` queries at a time (checkpointed), so memory is
O(query_chunk S D) instead of O(T S D). Every mask shape of
`dot_product_attention` broadcastable to [B, N, T, S] works, and the causal
patterns are masks (top-left aligned); all four patterns are supported. A row
with nothing to attend to is zeros; key/value slots no query may attend are
zeroed by a select first, so NaN/Inf there reach no output or gradient.
Layout: query [B, T, N, D], key [B, S, K, D] (N % K == 0), value
[B, S, K, Hv], w [N, D].
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._checks import check_broadcastable
from attnjax._dispatch import BackendConfig, Op
from attnjax._numerics import masked_softmax
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common

__all__ = ["AdditiveAttention", "AdditiveXla", "PointerNetwork",
           "additive_attention", "additive_attention_reference",
           "pointer_attention", "pointer_attention_reference", "SUPPORT"]

SUPPORT = {p: True for p in _common.PATTERNS}


@dataclasses.dataclass(frozen=True)
class AdditiveXla(BackendConfig):
  """'xla' backend tuning: queries per chunk (None: min(T, 128))."""
  backend: ClassVar[str] = "xla"
  query_chunk: Optional[int] = None


_OP = Op("additive_attention")


def _prepare(query, key, value, weight, mask, is_causal, bias, dropout_rate):
  _common.reject("bias", bias, "additive_attention",
                 "add a bias to the logits is not part of additive attention.")
  _common.reject("dropout_rate", dropout_rate, "additive_attention",
                 "attention dropout is not implemented.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  weight = jnp.asarray(weight)
  if tuple(weight.shape) != (n, h):
    raise ValueError(f"`weight` must be [num_heads, head_dim] = [{n}, {h}], "
                     f"got shape {tuple(weight.shape)}.")
  m4 = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"`mask` must be boolean (True = attend), got dtype "
                       f"{mask.dtype}.")
    if mask.ndim > 4 or (unbatched and mask.ndim == 4):
      raise ValueError(f"`mask` has too many dims for inputs of rank "
                       f"{3 if unbatched else 4}: shape {mask.shape}.")
    check_broadcastable("mask", mask, (b, n, t, s))
    m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  # key/value slots no query may attend -> zeros (select, not product)
  alive = None
  causal_col = jnp.arange(s) < t if is_causal else None
  if m4 is not None:
    if is_causal and m4.shape[2] != 1:
      m_eff = m4 & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
      alive = jnp.any(m_eff, axis=(1, 2))
    else:
      alive = jnp.any(m4, axis=(1, 2))
      if is_causal:
        alive = alive & causal_col
    alive = jnp.broadcast_to(alive, (b, s))
  elif is_causal and s > t:
    alive = jnp.broadcast_to(causal_col, (b, s))
  key = _common.zero_masked(key, alive)
  value = _common.zero_masked(value, alive)
  return query, key, value, weight, m4, dims, unbatched


def _logits(q, k, w, scale):
  """q [B, c, K, G, D], k [B, S, K, D], w [K, G, D] -> [B, K, G, c, S]."""
  z = jnp.tanh(q[:, :, None] + k[:, None, :, :, None, :])
  return scale * jnp.einsum("btskgd,kgd->bkgts", z, w)


def _allowed(m4, t0, c, s, is_causal, b, n):
  """bool [B|1, N|1, c|1, S] (or None) for queries t0 .. t0 + c - 1."""
  ok = None
  if m4 is not None:
    ok = (jax.lax.dynamic_slice_in_dim(m4, t0, c, axis=2)
          if m4.shape[2] != 1 else m4)
  if is_causal:
    causal = (jnp.arange(s)[None, :] <= (t0 + jnp.arange(c))[:, None])
    causal = causal[None, None]
    ok = causal if ok is None else ok & causal
  return ok


def _probs(q, k, w, m4, t0, is_causal, scale, n, kh):
  b, c = q.shape[:2]
  s = k.shape[1]
  g = n // kh
  logits = _logits(q.reshape(b, c, kh, g, -1), k, w.reshape(kh, g, -1), scale)
  logits = logits.reshape(b, n, c, s)
  ok = _allowed(m4, t0, c, s, is_causal, b, n)
  return masked_softmax(logits, ok, axis=-1)              # [B, N, c, S]


def _xla_backend(config, q, k, v, w, m4, is_causal, scale, want_probs):
  b, t, n, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  chunk = (config.query_chunk if config is not None and config.query_chunk
           else None) or min(t, 128)
  chunk = max(1, min(int(chunk), t))
  tp = _common.round_up(t, chunk)
  qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  mp = m4
  if m4 is not None and m4.shape[2] != 1:
    mp = jnp.pad(m4, ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  g = n // kh
  vg = v

  @jax.checkpoint
  def one(i):
    t0 = i * chunk
    qc = jax.lax.dynamic_slice_in_dim(qp, t0, chunk, axis=1)
    p = _probs(qc, k, w, mp, t0, is_causal, scale, n, kh)
    if want_probs:
      return p
    out = jnp.einsum("bkgts,bskd->btkgd", p.reshape(b, kh, g, chunk, s), vg)
    return out.reshape(b, chunk, n, -1)

  outs = jax.lax.map(one, jnp.arange(tp // chunk))
  if want_probs:           # [nc, B, N, c, S] -> [B, N, T, S]
    return jnp.moveaxis(outs, 0, 2).reshape(b, n, tp, s)[:, :, :t]
  return jnp.moveaxis(outs, 0, 1).reshape(b, tp, n, -1)[:, :t]


_OP.register("xla", _xla_backend, config_type=AdditiveXla)


def additive_attention(query, key, value, weight, *, mask=None,
                       is_causal: bool = False, scale: Optional[float] = None,
                       bias=None, dropout_rate: float = 0.0, dropout_rng=None,
                       implementation=None):
  """Additive (Bahdanau) attention.

  Args:
    query: [B, T, N, D] projected queries (W_a s); key: [B, S, K, D]
      projected keys (U_a h), N % K == 0; value: [B, S, K, Hv].
    weight: [N, D], the vector w of e = w . tanh(q + k) per query head.
    mask: bool broadcastable to [B, N, T, S], True = attend.
    is_causal: query t sees keys s <= t.
    scale: multiplies the logits (default 1).
    bias, dropout_rate: accepted for MultiHeadAttention; must be None/0.
    implementation: None/'xla' or `AdditiveXla(query_chunk=...)`.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with nothing to attend to are zeros.
  """
  del dropout_rng
  q, k, v, w, m4, dims, unbatched = _prepare(query, key, value, weight, mask,
                                             is_causal, bias, dropout_rate)
  f = jnp.float32
  out = _OP(implementation, q.astype(f), k.astype(f), v.astype(f),
            w.astype(f), m4, bool(is_causal),
            1.0 if scale is None else float(scale), False)
  out = out.astype(query.dtype)
  return out[0] if unbatched else out


def pointer_attention(query, key, weight, *, mask=None, is_causal: bool = False,
                      scale: Optional[float] = None, implementation=None):
  """The pointer distribution of Pointer Networks: softmax_s(w . tanh(q_t +
  k_s)) as float32 [B, N, T, S] (rows with nothing allowed are zeros).
  Arguments as `additive_attention` (no value)."""
  q, k, _, w, m4, dims, unbatched = _prepare(query, key, key, weight, mask,
                                             is_causal, None, 0.0)
  f = jnp.float32
  p = _OP(implementation, q.astype(f), k.astype(f), k.astype(f), w.astype(f),
          m4, bool(is_causal), 1.0 if scale is None else float(scale), True)
  return p[0] if unbatched else p


def _dense_probs(query, key, weight, mask, is_causal, scale):
  q, k, _, w, m4, dims, unbatched = _prepare(query, key, key, weight, mask,
                                             is_causal, None, 0.0)
  b, t, n, s, kh, h, _ = dims
  f = jnp.float32
  p = _probs(q.astype(f), k.astype(f), w.astype(f), m4, 0, is_causal,
             1.0 if scale is None else float(scale), n, kh)
  return p, dims, unbatched


def additive_attention_reference(query, key, value, weight, *, mask=None,
                                 is_causal: bool = False,
                                 scale: Optional[float] = None):
  """Forms all [B, T, S, N, D] pre-activations at once (no chunking)."""
  p, _, unbatched = _dense_probs(query, key, weight, mask, is_causal, scale)
  _, _, v, _, _, dims, _ = _prepare(query, key, value, weight, mask, is_causal,
                                    None, 0.0)
  b, t, n, s, kh, h, hv = dims
  out = jnp.einsum("bkgts,bskd->btkgd", p.reshape(b, kh, n // kh, t, s),
                   v.astype(jnp.float32)).reshape(b, t, n, hv)
  out = out.astype(query.dtype)
  return out[0] if unbatched else out


def pointer_attention_reference(query, key, weight, *, mask=None,
                                is_causal: bool = False,
                                scale: Optional[float] = None):
  p, _, unbatched = _dense_probs(query, key, weight, mask, is_causal, scale)
  return p[0] if unbatched else p


class AdditiveAttention(MultiHeadAttention):
  """MultiHeadAttention with `additive_attention`: the query/key projections
  are W_a / U_a and a trainable `weight` [num_heads, head_dim] is w."""

  def __init__(self, num_heads: int, in_features: int, *args,
               query_chunk: Optional[int] = None, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, *args, rngs=rngs, **kwargs)
    init = nnx.initializers.normal(1.0 / self.head_dim ** 0.5)
    self.weight = nnx.Param(init(rngs.params(), (num_heads, self.head_dim)))
    self.query_chunk = query_chunk

  def attend(self, q, k, v, **kwargs):
    return additive_attention(
        q, k, v, weight=self.weight.value,
        implementation=AdditiveXla(query_chunk=self.query_chunk), **kwargs)


class PointerNetwork(nnx.Module):
  """The pointer of Pointer Networks: `layer(decoder, encoder, mask=None)`
  -> p(C_t | ...) [B, T, S] = softmax_s(v . tanh(W2 d_t + W1 e_s)) over the
  input positions (single head, float32)."""

  def __init__(self, encoder_features: int, decoder_features: int,
               hidden: int, *, rngs: nnx.Rngs):
    self.w_enc = nnx.Linear(encoder_features, hidden, use_bias=False,
                            rngs=rngs)
    self.w_dec = nnx.Linear(decoder_features, hidden, use_bias=False,
                            rngs=rngs)
    init = nnx.initializers.normal(1.0 / hidden ** 0.5)
    self.v = nnx.Param(init(rngs.params(), (1, hidden)))

  def __call__(self, decoder, encoder, *, mask=None, is_causal: bool = False):
    q = self.w_dec(decoder)[..., None, :]
    k = self.w_enc(encoder)[..., None, :]
    if mask is not None and mask.ndim == 2:        # [B, S] key padding
      mask = mask[:, None, None, :]
    p = pointer_attention(q, k, self.v.value, mask=mask, is_causal=is_causal)
    return p[..., 0, :, :]
