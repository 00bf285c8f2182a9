"""Twins (Chu et al. 2021) LSA / GSA and LITv2 HiLo (Pan et al. 2022).

* LSA (locally-grouped self-attention) is attention within non-overlapping
  windows: `window_attention` without bias or shift.
* GSA (global sub-sampled attention): every query attends to a key/value map
  reduced by a strided `sr x sr` convolution (+ LayerNorm), as in PVT.
  `subsampled_attention(q, k, v)` is the attention between query map
  [B, *S, N, H] and a (smaller) key/value map [B, *S', K, H].
* HiLo: the heads are split by `alpha`; Lo-Fi heads (a fraction alpha)
  attend from every query to keys/values average-pooled over `ws x ws`
  windows (`pooled_attention`); Hi-Fi heads attend within `ws x ws` windows.
  Because the projections are affine, pooling keys/values equals projecting
  the pooled map, which is what LITv2 does.

Arbitrary resolutions: LSA / Hi-Fi windows pad and mask (see window.py);
Lo-Fi pooling averages only the valid positions of partial windows; GSA's
strided convolution runs on the map zero-padded to a multiple of sr.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     masked_softmax, repeat_kv, to_tuple)
from attnjax.spatial.window import WindowAttention, _split, window_attention

__all__ = ["subsampled_attention", "pooled_attention",
           "pooled_attention_reference", "average_pool", "LocallyGroupedAttention",
           "GlobalSubsampledAttention", "HiLoAttention"]


def subsampled_attention(query, key, value, *, scale: Optional[float] = None,
                         key_mask=None):
  """Full attention of query map [B, *S, N, H] over key/value map
  [B, *S', K, Hv] (any spatial sizes, same number of spatial dims).
  `key_mask` (bool [B, *S'], True = valid): masked keys never reach the
  output or gradients; a query with no valid key returns zeros."""
  nd, n, _ = check_spatial_qkv(query, key, value, same_spatial=False)
  if key_mask is not None and tuple(key_mask.shape) != tuple(key.shape[:-2]):
    raise ValueError(
        f"`key_mask` must have shape [B, *S']={tuple(key.shape[:-2])}, got "
        f"{tuple(key_mask.shape)} (key {tuple(key.shape)}).")
  scale = default_scale(scale, query.shape[-1])
  q = flatten_spatial(query)
  k, v = (repeat_kv(flatten_spatial(x), n) for x in (key, value))
  ok = None
  if key_mask is not None:
    valid = key_mask.reshape(key_mask.shape[0], -1).astype(bool)
    k = jnp.where(valid[:, :, None, None], k, jnp.zeros((), k.dtype))
    v = jnp.where(valid[:, :, None, None], v, jnp.zeros((), v.dtype))
    ok = valid[:, None, None, :]
  logits = jnp.einsum("bqnh,bknh->bnqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits, ok)
  out = jnp.einsum("bnqk,bknh->bqnh", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def average_pool(x, pool_size):
  """Mean over non-overlapping pool windows of x [B, *S, ...] (len(pool_size)
  spatial dims); partial windows at the end average their valid entries."""
  if not isinstance(pool_size, (tuple, list)):
    raise ValueError(
        f"`pool_size` must be a tuple with one positive int per pooled "
        f"spatial dim, got {pool_size!r}.")
  nd = len(pool_size)
  if nd < 1 or x.ndim < nd + 1:
    raise ValueError(
        f"`pool_size` {pool_size!r} needs x of rank >= {nd + 1} "
        f"([batch, *spatial, ...]), got shape {tuple(x.shape)}.")
  pool_size = to_tuple("pool_size", pool_size, nd)
  spatial = x.shape[1:1 + nd]
  padded = tuple(-(-l // p) * p for l, p in zip(spatial, pool_size))
  nw = tuple(p // w for p, w in zip(padded, pool_size))
  pads = [(0, 0)] + [(0, p - l) for p, l in zip(padded, spatial)] + [(0, 0)] * (
      x.ndim - 1 - nd)
  xs = _split(jnp.pad(x.astype(jnp.float32), pads), nd, nw, pool_size,
              inner_last=True)
  valid = np.ones(padded, np.float32)
  for a in range(nd):
    shape = [1] * nd
    shape[a] = padded[a]
    valid = valid * (np.arange(padded[a]) < spatial[a]).reshape(shape)
  vs = _split(valid[None], nd, nw, pool_size, inner_last=True)[0]
  axes = tuple(range(1 + nd, 1 + 2 * nd))
  cnt = vs.sum(axis=tuple(range(nd, 2 * nd)))
  tot = xs.sum(axis=axes)
  cnt = cnt.reshape((1,) + cnt.shape + (1,) * (tot.ndim - 1 - nd))
  return (tot / cnt).astype(x.dtype)


def pooled_attention(query, key, value, pool_size, *,
                     scale: Optional[float] = None):
  """HiLo Lo-Fi: every query attends to keys/values average-pooled over
  non-overlapping `pool_size` windows. [B, *S, N, H] -> [B, *S, N, Hv]."""
  nd, _, _ = check_spatial_qkv(query, key, value)
  pool = to_tuple("pool_size", pool_size, nd)
  return subsampled_attention(query, average_pool(key, pool),
                              average_pool(value, pool), scale=scale)


def pooled_attention_reference(query, key, value, pool_size, *, scale=None):
  """Dense attention over explicitly averaged key/value windows (oracle)."""
  nd, n, _ = check_spatial_qkv(query, key, value)
  pool = np.array(to_tuple("pool_size", pool_size, nd))
  spatial = np.array(query.shape[1:1 + nd])
  c = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"),
               -1).reshape(-1, nd)
  cell = c // pool
  cells = np.unique(cell, axis=0)
  avg = (cell[None] == cells[:, None]).all(-1).astype(np.float32)
  avg /= avg.sum(-1, keepdims=True)                              # [S', S]
  kf, vf = (flatten_spatial(x).astype(jnp.float32) for x in (key, value))
  kp = jnp.einsum("ps,bsnh->bpnh", avg, kf)
  vp = jnp.einsum("ps,bsnh->bpnh", avg, vf)
  out = dense_attention_reference(
      flatten_spatial(query).astype(jnp.float32), kp, vp,
      scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:]).astype(query.dtype)


class LocallyGroupedAttention(WindowAttention):
  """Twins LSA on [B, H, W, C]: `qkv` Linear(dim, 3 dim), `proj`; attention
  within window_size x window_size groups, no relative position bias."""

  def __init__(self, dim: int, num_heads: int, window_size=7, **kwargs):
    kwargs.setdefault("use_rpb", False)
    super().__init__(dim, num_heads, window_size, shift_size=0, **kwargs)


class GlobalSubsampledAttention(HeadGated):
  """Twins GSA / PVT spatial-reduction attention on [B, H, W, C].

  Parameters as Twins' GlobalSubSampleAttn: `q` Linear(dim, dim), `kv`
  Linear(dim, 2 dim) (bias=qkv_bias), `proj` Linear(dim, dim) and, when
  sr_ratio > 1, `sr` Conv(dim, dim, sr, stride sr) + `norm` LayerNorm(dim).
  """

  def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, *,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.sr_ratio = sr_ratio
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.kv = nnx.Linear(dim, 2 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    if sr_ratio > 1:
      self.sr = nnx.Conv(dim, dim, (sr_ratio, sr_ratio), (sr_ratio, sr_ratio),
                         padding="VALID", **kw)
      self.norm = nnx.LayerNorm(dim, **kw)
    else:
      self.sr = None
      self.norm = None

  def __call__(self, x):
    check_channels_last(x, self.q.in_features, 2)
    n, d = self.num_heads, self.head_dim
    q = self.q(x).reshape(*x.shape[:-1], n, d)
    xr = x
    if self.sr is not None:
      r = self.sr_ratio
      xr = jnp.pad(x, [(0, 0), (0, (-x.shape[1]) % r), (0, (-x.shape[2]) % r),
                       (0, 0)])
      xr = self.norm(self.sr(xr))
    kv = self.kv(xr).reshape(*xr.shape[:-1], 2, n, d)
    out = subsampled_attention(q, kv[..., 0, :, :], kv[..., 1, :, :],
                               scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))


class HiLoAttention(HeadGated):
  """LITv2 HiLo attention on [B, H, W, C].

  l_heads = int(num_heads * alpha) Lo-Fi heads, the rest Hi-Fi; with
  window_size == 1 all heads are Lo-Fi (as LITv2). Parameters as LITv2:
  Lo-Fi `l_q` Linear(dim, l_dim), `l_kv` Linear(dim, 2 l_dim), `l_proj`
  Linear(l_dim, l_dim); Hi-Fi `h_qkv` Linear(dim, 3 h_dim), `h_proj`
  Linear(h_dim, h_dim). Output = concat(Hi-Fi, Lo-Fi) along channels.
  """

  def __init__(self, dim: int, num_heads: int = 8, window_size: int = 2,
               alpha: float = 0.5, *, qkv_bias: bool = False,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.head_dim = head_dim
    self.num_heads = num_heads
    self.window_size = window_size
    self.l_heads = int(num_heads * alpha)
    self.h_heads = num_heads - self.l_heads
    if window_size == 1:
      self.h_heads, self.l_heads = 0, num_heads
    l_dim, h_dim = self.l_heads * head_dim, self.h_heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if self.l_heads > 0:
      self.l_q = nnx.Linear(dim, l_dim, use_bias=qkv_bias, **kw)
      self.l_kv = nnx.Linear(dim, 2 * l_dim, use_bias=qkv_bias, **kw)
      self.l_proj = nnx.Linear(l_dim, l_dim, **kw)
    if self.h_heads > 0:
      self.h_qkv = nnx.Linear(dim, 3 * h_dim, use_bias=qkv_bias, **kw)
      self.h_proj = nnx.Linear(h_dim, h_dim, **kw)

  def __call__(self, x):
    check_channels_last(
        x, (self.h_qkv if self.h_heads > 0 else self.l_q).in_features, 2)
    d, ws = self.head_dim, self.window_size
    outs = []
    if self.h_heads > 0:
      qkv = self.h_qkv(x).reshape(*x.shape[:-1], 3, self.h_heads, d)
      o = window_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                           qkv[..., 2, :, :], ws, scale=self.scale)
      o = self.gate_heads(o, slice(0, self.h_heads))
      outs.append(self.h_proj(o.reshape(*x.shape[:-1], -1)))
    if self.l_heads > 0:
      q = self.l_q(x).reshape(*x.shape[:-1], self.l_heads, d)
      xp = average_pool(x, (ws, ws)) if ws > 1 else x
      kv = self.l_kv(xp).reshape(*xp.shape[:-1], 2, self.l_heads, d)
      o = subsampled_attention(q, kv[..., 0, :, :], kv[..., 1, :, :],
                               scale=self.scale)
      o = self.gate_heads(o, slice(self.h_heads, None))
      outs.append(self.l_proj(o.reshape(*x.shape[:-1], -1)))
    return jnp.concatenate(outs, axis=-1)
