"""Relative convolutional multi-head attention (RCMHA; Sugiharto, Aradea and
Mubarok 2023, "RCMHA: Relative Convolutional Multi-Head Attention for
Natural Language Modelling").

RCMHA changes MHA in two places: a depth-wise convolution along the
sequence on the projected queries, keys and values (as in Primer's
multi-dconv-head attention), and a relative-position term in the scores:

  q' = dwconv(q),  k' = dwconv(k),  v' = dwconv(v)     (per head and channel)
  e_ij = scale * (q'_i . k'_j + q'_i . r_{clip(j - i, -M, M)})
  out_i = sum_j softmax_j(e_ij) v'_j

with `rel_embeddings` r [2M + 1, N, H] (Shaw et al.'s clipped relative
embeddings, one table per query head; index d + M for distance d = j - i)
and depth-wise kernels [w, heads, dim]. With `is_causal` the convolutions are
causal (position t mixes t - w + 1 .. t), so no future position reaches a
query through a convolved key or value; otherwise they are centered ("same"
padding). Scores are formed densely (the relative term is a [B, N, T, S]
bias to `dot_product_attention`), so cost is that of softmax attention.

Masks: any mask of `dot_product_attention`. Key/value positions that no query
may attend are zeroed by a select *before* the convolutions, so NaN/Inf in a
padded slot cannot spread into its neighbours; a fully masked row is zeros.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import masked_softmax
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.softmax import dot_product_attention

__all__ = ["RCMHAttention", "SUPPORT", "depthwise_conv", "rcmha_attention",
           "rcmha_attention_reference", "relative_position_bias"]

SUPPORT = {p: True for p in _common.PATTERNS}

_OP = Op("rcmha")


def depthwise_conv(x, kernel, *, causal: bool):
  """x [B, L, C, D] convolved along L with kernel [w, C, D] per channel:
  causal -> out_t = sum_u kernel[u] x_{t - w + 1 + u}; else centered."""
  w = kernel.shape[0]
  left = w - 1 if causal else (w - 1) // 2
  xp = jnp.pad(x, ((0, 0), (left, w - 1 - left), (0, 0), (0, 0)))
  b, l, c, d = x.shape
  lhs = jnp.moveaxis(xp.reshape(b, l + w - 1, c * d), 1, 2)   # [B, C*D, L+w-1]
  rhs = kernel.reshape(w, c * d).T[:, None, :]                # [C*D, 1, w]
  out = jax.lax.conv_general_dilated(
      lhs, rhs, window_strides=(1,), padding="VALID",
      dimension_numbers=("NCW", "OIW", "NCW"), feature_group_count=c * d,
      precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out, 1, 2).reshape(b, l, c, d)


def relative_position_bias(query, rel_embeddings, t: int, s: int):
  """q_i . r_{clip(j - i)} as [B, N, T, S] (float32)."""
  m = (rel_embeddings.shape[0] - 1) // 2
  qr = jnp.einsum("btnh,rnh->bntr", query, rel_embeddings)     # [B,N,T,2M+1]
  idx = jnp.clip(jnp.arange(s)[None, :] - jnp.arange(t)[:, None], -m, m) + m
  return jnp.take_along_axis(qr, jnp.broadcast_to(idx, qr.shape[:2] + idx.shape),
                             axis=-1)


def _alive_columns(m4, is_causal, b, t, s):
  alive = None
  if m4 is not None:
    alive = jnp.broadcast_to(jnp.any(m4, axis=(1, 2)), (b, s))
  if is_causal and s > t:
    c = jnp.broadcast_to(jnp.arange(s) < t, (b, s))
    alive = c if alive is None else alive & c
  return alive


def _check_kernel(name, kern, heads, dim):
  if kern is None:
    return None
  kern = jnp.asarray(kern)
  if kern.ndim != 3 or tuple(kern.shape[1:]) != (heads, dim) or kern.shape[0] < 1:
    raise ValueError(f"`{name}` must be [width, {heads}, {dim}] (depth-wise "
                     f"kernel per head and channel), got {tuple(kern.shape)}.")
  return kern.astype(jnp.float32)


def _prepare(query, key, value, rel, conv_q, conv_k, conv_v, mask, is_causal,
             dropout_rate):
  _common.reject("dropout_rate", dropout_rate, "rcmha_attention",
                 "attention dropout is not implemented.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, kh, h, hv = dims
  rel = jnp.asarray(rel)
  if rel.ndim != 3 or rel.shape[0] % 2 == 0 or tuple(rel.shape[1:]) != (n, h):
    raise ValueError(f"`rel_embeddings` must be [2M + 1, {n}, {h}] (odd "
                     f"length, per query head), got {tuple(rel.shape)}.")
  cq = _check_kernel("conv_q", conv_q, n, h)
  ck = _check_kernel("conv_k", conv_k, kh, h)
  cv = _check_kernel("conv_v", conv_v, kh, hv)
  m4 = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or mask.ndim > 4 or (unbatched and
                                                    mask.ndim == 4):
      raise ValueError(f"`mask` must be boolean with rank <= "
                       f"{3 if unbatched else 4}, got {mask.dtype} {mask.shape}.")
    _common.check_broadcastable("mask", mask, (b, n, t, s))
    m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  alive = _alive_columns(m4, is_causal, b, t, s)
  f = jnp.float32
  k = _common.zero_masked(key, alive).astype(f)
  v = _common.zero_masked(value, alive).astype(f)
  q = query.astype(f)
  if cq is not None:
    q = depthwise_conv(q, cq, causal=is_causal)
  if ck is not None:
    k = depthwise_conv(k, ck, causal=is_causal)
  if cv is not None:
    v = depthwise_conv(v, cv, causal=is_causal)
  return q, k, v, rel.astype(f), m4, dims, unbatched


def _xla_backend(config, q, k, v, rel, m4, is_causal, scale, bias):
  del config
  t, s = q.shape[1], k.shape[1]
  rb = scale * relative_position_bias(q, rel, t, s)
  if bias is not None:
    rb = rb + bias
  return dot_product_attention(q, k, v, bias=rb, mask=m4, is_causal=is_causal,
                               scale=scale)


_OP.register("xla", _xla_backend)


def rcmha_attention(query, key, value, rel_embeddings, *, conv_q=None,
                    conv_k=None, conv_v=None, mask=None, is_causal: bool = False,
                    scale: Optional[float] = None, bias=None,
                    dropout_rate: float = 0.0, dropout_rng=None,
                    implementation=None):
  """Relative convolutional multi-head attention.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key [B, S, K, H]; value [B, S, K, Hv].
    rel_embeddings: [2M + 1, N, H] relative-position embeddings.
    conv_q / conv_k / conv_v: depth-wise kernels [w, N, H] / [w, K, H] /
      [w, K, Hv] (None: no convolution of that input).
    mask, is_causal, scale, bias: as `dot_product_attention` (bias is added
      after the relative term).
    implementation: dispatch of op "rcmha" (only "xla").

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  q, k, v, rel, m4, dims, unbatched = _prepare(
      query, key, value, rel_embeddings, conv_q, conv_k, conv_v, mask,
      is_causal, dropout_rate)
  scale = _common.default_scale(scale, dims[5])
  out = _OP(implementation, q, k, v, rel, m4, bool(is_causal), scale, bias)
  out = out.astype(query.dtype)
  return out[0] if unbatched else out


def rcmha_attention_reference(query, key, value, rel_embeddings, *,
                              conv_q=None, conv_k=None, conv_v=None, mask=None,
                              is_causal: bool = False,
                              scale: Optional[float] = None):
  """Explicit relative logits per (i, j) and a masked softmax."""
  q, k, v, rel, m4, dims, unbatched = _prepare(
      query, key, value, rel_embeddings, conv_q, conv_k, conv_v, mask,
      is_causal, 0.0)
  b, t, n, s, kh, h, hv = dims
  scale = _common.default_scale(scale, h)
  g = n // kh
  m = (rel.shape[0] - 1) // 2
  d = jnp.clip(jnp.arange(s)[None, :] - jnp.arange(t)[:, None], -m, m) + m
  r_ij = rel[d]                                             # [T, S, N, H]
  kk = jnp.repeat(k, g, axis=2)
  vv = jnp.repeat(v, g, axis=2)
  logits = scale * (jnp.einsum("btnh,bsnh->bnts", q, kk) +
                    jnp.einsum("btnh,tsnh->bnts", q, r_ij))
  ok = jnp.ones((b, n, t, s), bool)
  if m4 is not None:
    ok = ok & m4
  if is_causal:
    ok = ok & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None])
  p = masked_softmax(logits, ok, axis=-1)
  out = jnp.einsum("bnts,bsnd->btnd", p, vv).astype(query.dtype)
  return out[0] if unbatched else out


class RCMHAttention(MultiHeadAttention):
  """MultiHeadAttention with `rcmha_attention`: trainable depth-wise kernels
  (width `conv_width`, initialised to the identity: the layer starts as MHA
  plus the relative term) and relative embeddings for distances up to
  `max_distance`."""

  def __init__(self, num_heads: int, in_features: int, *args,
               conv_width: int = 3, max_distance: int = 16, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(num_heads, in_features, *args, rngs=rngs, **kwargs)
    w = _common.check_positive_int("conv_width", conv_width)
    m = _common.check_positive_int("max_distance", max_distance)
    n, kh, h = self.num_heads, self.num_kv_heads, self.head_dim
    self.conv_width = w

    # kernels are stored as offsets from the identity tap (added per call)
    self.conv_q = nnx.Param(jnp.zeros((w, n, h)))
    self.conv_k = nnx.Param(jnp.zeros((w, kh, h)))
    self.conv_v = nnx.Param(jnp.zeros((w, kh, self.head_dim)))
    self.rel_embeddings = nnx.Param(nnx.initializers.normal(
        1.0 / math.sqrt(h))(rngs.params(), (2 * m + 1, n, h)))
    self.attention_fn = rcmha_attention

  def __call__(self, *args, is_causal: bool = False,
               attention_kwargs: Optional[dict] = None, **kwargs):
    # identity tap: the current position (last tap if causal, centre if not)
    w = self.conv_width
    tap = w - 1 if is_causal else (w - 1) // 2
    eye = jnp.zeros((w, 1, 1)).at[tap].set(1.0)
    kw = dict(attention_kwargs or {},
              rel_embeddings=self.rel_embeddings.value,
              conv_q=self.conv_q.value + eye, conv_k=self.conv_k.value + eye,
              conv_v=self.conv_v.value + eye)
    return super().__call__(*args, is_causal=is_causal, attention_kwargs=kw,
                            **kwargs)
