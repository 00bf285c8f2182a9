"""Gated positional self-attention (ConViT, d'Ascoli et al. 2021).

Per head h, with gate g_h:
  A = (1 - sigmoid(g_h)) softmax(scale q k^T) + sigmoid(g_h) softmax(r W_h + b_h)
where r[i, j] are the relative-position features of key j seen from query
i: the coordinate offsets (key - query), last spatial axis first (ConViT's
(dx, dy) in 2D), then the squared distance. `pos_weight` [nd + 1, heads]
and `pos_bias` [heads] are the positional projection. The result rows sum
to one (ConViT's renormalization is then a no-op). Dense S x S by
definition.

`convolutional_init` gives ConViT's locality initialization: with
k = int(sqrt(heads)), head h1 + k * h2 attends at init to the offset
(h1 - c, h2 - c) (rows, columns), sharper with larger locality_strength.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, flatten_spatial,
                                     heads_and_scale, masked_softmax, repeat_kv)

__all__ = ["gated_positional_attention", "gated_positional_attention_reference",
           "relative_position_features", "convolutional_init", "GPSA"]


def relative_position_features(spatial_shape) -> np.ndarray:
  """[S, S, nd + 1] float32: offsets key - query (last axis first), then
  squared distance."""
  nd = len(spatial_shape)
  c = np.stack(np.meshgrid(*[np.arange(s) for s in spatial_shape],
                           indexing="ij"), -1).reshape(-1, nd)
  off = (c[None, :, :] - c[:, None, :])[..., ::-1]
  return np.concatenate([off, (off ** 2).sum(-1, keepdims=True)],
                        -1).astype(np.float32)


def _check(query, key, value, pos_weight, pos_bias, gate):
  nd, n, _ = check_spatial_qkv(query, key, value)
  if tuple(pos_weight.shape) != (nd + 1, n):
    raise ValueError(
        f"`pos_weight` must have shape [spatial_dims + 1, heads]={(nd + 1, n)}, "
        f"got {tuple(pos_weight.shape)}.")
  if pos_bias is not None and tuple(pos_bias.shape) != (n,):
    raise ValueError(f"`pos_bias` must have shape [{n}], got {tuple(pos_bias.shape)}.")
  if tuple(jnp.shape(gate)) != (n,):
    raise ValueError(f"`gate` must have shape [{n}], got {tuple(jnp.shape(gate))}.")
  return nd, n


def gated_positional_attention(query, key, value, pos_weight, pos_bias, gate,
                               *, scale: Optional[float] = None):
  """GPSA on [B, *spatial, N, D] -> [B, *spatial, N, Dv] (query.dtype)."""
  nd, n = _check(query, key, value, pos_weight, pos_bias, gate)
  scale = default_scale(scale, query.shape[-1])
  q = flatten_spatial(query)
  k, v = (repeat_kv(flatten_spatial(x), n) for x in (key, value))
  rel = jnp.asarray(relative_position_features(query.shape[1:1 + nd]))
  pos = jnp.einsum("qkf,fn->nqk", rel, pos_weight.astype(jnp.float32))
  if pos_bias is not None:
    pos = pos + pos_bias.astype(jnp.float32)[:, None, None]
  content = masked_softmax(jnp.einsum("bqnh,bknh->bnqk", q, k,
                                      preferred_element_type=jnp.float32)
                           * scale)
  sg = jax.nn.sigmoid(gate.astype(jnp.float32))[None, :, None, None]
  attn = (1.0 - sg) * content + sg * jax.nn.softmax(pos, -1)[None]
  out = jnp.einsum("bnqk,bknh->bqnh", attn.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def gated_positional_attention_reference(query, key, value, pos_weight,
                                         pos_bias, gate, *, scale=None):
  """Per-head loop with explicit coordinates (plain jnp oracle)."""
  nd, n = _check(query, key, value, pos_weight, pos_bias, gate)
  scale = default_scale(scale, query.shape[-1])
  spatial = query.shape[1:1 + nd]
  coords = np.array(list(np.ndindex(*spatial)), np.float32)        # [S, nd]
  f32 = lambda x: flatten_spatial(x).astype(jnp.float32)
  q, k, v = f32(query), f32(key), f32(value)
  rep = n // key.shape[-2]
  outs = []
  for h in range(n):
    delta = coords[None, :, :] - coords[:, None, :]                # key - query
    feats = [delta[..., a] for a in reversed(range(nd))]
    feats.append((delta ** 2).sum(-1))
    pl = sum(f * pos_weight[i, h] for i, f in enumerate(feats))
    if pos_bias is not None:
      pl = pl + pos_bias[h]
    cl = jnp.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h // rep]) * scale
    g = 1.0 / (1.0 + jnp.exp(-gate[h]))
    a = (1 - g) * jax.nn.softmax(cl, -1) + g * jax.nn.softmax(pl, -1)[None]
    a = a / a.sum(-1, keepdims=True)
    outs.append(jnp.einsum("bqk,bkd->bqd", a, v[:, :, h // rep]))
  out = jnp.stack(outs, 2)
  return out.reshape(query.shape[:-1] + value.shape[-1:]).astype(query.dtype)


def convolutional_init(num_heads: int, locality_strength: float = 1.0,
                       locality_distance: float = 1.0) -> np.ndarray:
  """ConViT's local init of pos_weight [3, heads] (2D)."""
  w = np.zeros((3, num_heads), np.float32)
  ks = int(num_heads ** 0.5)
  center = (ks - 1) / 2 if ks % 2 == 0 else ks // 2
  for h1 in range(ks):
    for h2 in range(ks):
      p = h1 + ks * h2
      w[2, p] = -1.0
      w[1, p] = 2 * (h1 - center) * locality_distance
      w[0, p] = 2 * (h2 - center) * locality_distance
  return w * locality_strength


class GPSA(HeadGated):
  """ConViT gated positional self-attention on patch maps [B, H, W, dim].

  Parameters as ConViT's GPSA: `qk` Linear(dim, 2 dim, bias=qkv_bias), `v`
  Linear(dim, dim, bias=qkv_bias), `proj` Linear(dim, dim), `pos_proj`
  Linear(3, heads), `gating_param` [heads] (init 1). With use_local_init
  (ConViT default) v is the identity and pos_proj gets `convolutional_init`.
  """

  def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False,
               qk_scale: Optional[float] = None, locality_strength: float = 1.0,
               use_local_init: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qk = nnx.Linear(dim, 2 * dim, use_bias=qkv_bias, **kw)
    self.v = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    self.pos_proj = nnx.Linear(3, num_heads, **kw)
    self.gating_param = nnx.Param(jnp.ones((num_heads,), param_dtype))
    if use_local_init:
      self.v.kernel[...] = jnp.eye(dim, dtype=param_dtype)
      self.pos_proj.kernel[...] = jnp.asarray(
          convolutional_init(num_heads, locality_strength), param_dtype)

  def __call__(self, x):
    check_channels_last(x, self.qk.in_features, 2)
    n, d = self.num_heads, self.head_dim
    qk = self.qk(x).reshape(*x.shape[:-1], 2, n, d)
    v = self.v(x).reshape(*x.shape[:-1], n, d)
    out = gated_positional_attention(
        qk[..., 0, :, :], qk[..., 1, :, :], v, self.pos_proj.kernel[...],
        self.pos_proj.bias[...], self.gating_param[...], scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
