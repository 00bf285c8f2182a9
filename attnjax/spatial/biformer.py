"""Bi-level routing attention (BiFormer, Zhu et al. 2023), 2D.

1. The map is cut into num_regions x num_regions regions (each axis padded
   at the end to a multiple of num_regions; padded tokens are masked as keys
   and excluded from region means).
2. Region-level queries/keys are the means of the tokens' q/k over each
   region (all heads concatenated); region affinity A = (q_r * scale) k_r^T.
3. Each region keeps its `topk` most affine regions (routing is not
   differentiated, BiFormer's default `diff_routing=False`).
4. Token attention: every query of a region attends to all tokens of its
   routed regions (multi-head).
The local context enhancement (LCE, a depthwise 5x5 conv of V added to the
output) lives in the layer.
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
                                     masked_softmax, repeat_kv)
from attnjax.spatial.window import _merge, _split

__all__ = ["bi_level_routing_attention", "bi_level_routing_attention_reference",
           "region_routing", "BiLevelRoutingAttention"]


def _check(query, key, value, num_regions, topk):
  _, n, kh = check_spatial_qkv(query, key, value, spatial_dims=(2,))
  if not isinstance(num_regions, (int, np.integer)) or num_regions < 1:
    raise ValueError(f"`num_regions` must be a positive int, got {num_regions!r}.")
  if not 1 <= topk <= num_regions ** 2:
    raise ValueError(
        f"`topk` must be in [1, num_regions**2={num_regions ** 2}], got {topk}.")
  return n


def region_routing(query, key, num_regions: int, topk: int, scale: float):
  """Top-k routed region indices [B, R, topk] (R = num_regions**2, row-major).

  Region means over valid tokens only; computed without gradient.
  """
  b, h, w = query.shape[:3]
  r = num_regions
  c = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
  rh, rw = -(-h // r), -(-w // r)
  region = (c[..., 0] // rh) * r + (c[..., 1] // rw)               # [h, w]
  onehot = (region.reshape(-1)[None] == np.arange(r * r)[:, None]).astype(
      np.float32)
  onehot /= np.maximum(onehot.sum(-1, keepdims=True), 1.0)
  qf = flatten_spatial(query).reshape(b, h * w, -1).astype(jnp.float32)
  kf = repeat_kv(flatten_spatial(key), query.shape[-2]).reshape(
      b, h * w, -1).astype(jnp.float32)
  qr = jnp.einsum("rs,bsc->brc", onehot, qf)
  kr = jnp.einsum("rs,bsc->brc", onehot, kf)
  aff = jax.lax.stop_gradient(jnp.einsum("brc,bpc->brp", qr * scale, kr))
  # Regions that hold no token at all (tiny inputs) are never routed to.
  empty = onehot.sum(-1) == 0
  aff = jnp.where(jnp.asarray(empty)[None, None],
                  float(np.finfo(np.float32).min), aff)
  return jax.lax.top_k(aff, topk)[1]


def bi_level_routing_attention(query, key, value, num_regions: int, topk: int,
                               *, scale: Optional[float] = None):
  """BiFormer bi-level routing attention on [B, H, W, N, D].

  Args:
    num_regions: regions per axis (BiFormer's n_win, 7 for 224 inputs).
    topk: routed regions per region.
    scale: logit scale for routing and token attention, default 1/sqrt(D)
      (BiFormer's code uses dim**-0.5 with dim = all heads' channels; the
      layer passes that).
  Returns: [B, H, W, N, Dv] in query.dtype.
  """
  n = _check(query, key, value, num_regions, topk)
  scale = default_scale(scale, query.shape[-1])
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  b, h, w = query.shape[:3]
  r = num_regions
  rh, rw = -(-h // r), -(-w // r)
  idx = region_routing(query, key, r, topk, scale)                 # [B, R, k]

  def regions(x):
    x = jnp.pad(x, [(0, 0), (0, rh * r - h), (0, rw * r - w), (0, 0), (0, 0)])
    x = _split(x, 2, (r, r), (rh, rw), inner_last=True)
    return x.reshape(b, r * r, rh * rw, *x.shape[-2:])             # [B, R, T, N, D]

  qw, kw, vw = regions(query), regions(key), regions(value)
  valid = np.zeros((rh * r, rw * r), bool)
  valid[:h, :w] = True
  valid = _split(valid[None, ..., None, None], 2, (r, r), (rh, rw),
                 inner_last=True).reshape(r * r, rh * rw)
  take = jax.vmap(lambda x, i: x[i])                               # per batch
  kg = take(kw, idx).reshape(b, r * r, topk * rh * rw, *kw.shape[-2:])
  vg = take(vw, idx).reshape(b, r * r, topk * rh * rw, *vw.shape[-2:])
  mg = jnp.asarray(valid)[idx].reshape(b, r * r, topk * rh * rw)
  logits = jnp.einsum("brqnh,brknh->brnqk", qw, kg,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits, mg[:, :, None, None, :])
  out = jnp.einsum("brnqk,brknh->brqnh", p.astype(vg.dtype), vg,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  out = out.reshape(b, r, r, rh, rw, n, value.shape[-1])
  out = _merge(out, 2, inner_last=True)
  return out[:, :h, :w]


def bi_level_routing_attention_reference(query, key, value, num_regions, topk,
                                         *, scale=None):
  """Dense masked attention: token i sees token j iff j's region is among
  the top-k routed regions of i's region (routing via `region_routing`)."""
  n = _check(query, key, value, num_regions, topk)
  scale = default_scale(scale, query.shape[-1])
  b, h, w = query.shape[:3]
  r = num_regions
  rh, rw = -(-h // r), -(-w // r)
  c = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"),
               -1).reshape(-1, 2)
  region = (c[:, 0] // rh) * r + c[:, 1] // rw                     # [S]
  idx = region_routing(query, key, r, topk, scale)                 # [B, R, k]
  routed = (idx[..., None] == jnp.arange(r * r)).any(-2)           # [B, R, R]
  mask = routed[:, region][:, :, region]                           # [B, S, S]
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      mask[:, None], None, scale=scale)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class BiLevelRoutingAttention(HeadGated):
  """BiFormer BRA layer on [B, H, W, dim].

  Parameters as BiFormer (qk_dim = dim, identity kv downsampling, no
  parametric routing): `qkv` Linear(dim, 3 dim), `lepe` depthwise
  Conv(dim, dim, side_dwconv, groups=dim) (LCE on V), `wo` Linear(dim, dim).
  Scale: qk_scale (0.0 honoured) or dim**-0.5 (BiFormer's choice), for routing and tokens.
  """

  def __init__(self, dim: int, num_heads: int = 8, num_regions: int = 7,
               topk: int = 4, *, side_dwconv: int = 5,
               qk_scale: Optional[float] = None, qkv_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale,
                                                scale_dim=dim)
    self.num_regions = num_regions
    self.topk = topk
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.wo = nnx.Linear(dim, dim, **kw)
    self.lepe = (nnx.Conv(dim, dim, (side_dwconv, side_dwconv),
                          feature_group_count=dim, padding="SAME", **kw)
                 if side_dwconv > 0 else None)

  def __call__(self, x):
    check_channels_last(x, self.qkv.in_features, 2)
    n, d = self.num_heads, self.head_dim
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, n, d)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    topk = min(self.topk, self.num_regions ** 2)
    out = bi_level_routing_attention(q, k, v, self.num_regions, topk,
                                     scale=self.scale).reshape(x.shape)
    if self.lepe is not None:
      out = out + self.lepe(v.reshape(x.shape))
    return self.wo(self.gate_heads(out.reshape(*x.shape[:-1], n, d))
                   .reshape(x.shape))
