"""Channel group attention (DaViT, Ding et al. 2022).

Within each head (channel group), the roles are transposed: the head_dim
channels are the tokens and the spatial positions are their features.
attn[b, n] = softmax_j(scale * sum_s q[b, s, n, i] k[b, s, n, j]) is
[head_dim x head_dim]; out[b, s, n, i] = sum_j attn[b, n, i, j] v[b, s, n, j].
Cost is linear in the number of pixels and resolution-independent in shape.
DaViT's scale is head_dim**-0.5 (not 1/sqrt(#pixels)), the default here.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     masked_softmax)

__all__ = ["channel_attention", "channel_attention_reference",
           "ChannelAttention"]


def _check(query, key, value):
  nd, n, kh = check_spatial_qkv(query, key, value)
  if kh != n or value.shape[-1] != query.shape[-1]:
    raise ValueError(
        "channel attention needs query, key and value of identical shape, got "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
        f"value={tuple(value.shape)}.")


def channel_attention(query, key, value, *, scale: Optional[float] = None):
  """[B, *spatial, N, D] -> [B, *spatial, N, D]; D x D attention per head."""
  _check(query, key, value)
  scale = default_scale(scale, query.shape[-1])
  q, k, v = (flatten_spatial(x) for x in (query, key, value))
  logits = jnp.einsum("bsni,bsnj->bnij", q, k,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits)
  out = jnp.einsum("bnij,bsnj->bsni", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(query.dtype).reshape(query.shape)


def channel_attention_reference(query, key, value, *, scale=None):
  """Ordinary attention with tokens = channels, features = pixels."""
  _check(query, key, value)
  scale = default_scale(scale, query.shape[-1])
  # [B, S, N, D] -> [B, D(tokens), N, S(features)]
  t = lambda x: flatten_spatial(x).transpose(0, 3, 2, 1)
  out = dense_attention_reference(t(query), t(key), t(value), scale=scale)
  return out.transpose(0, 3, 2, 1).reshape(query.shape)


class ChannelAttention(HeadGated):
  """DaViT channel attention on [B, *spatial, dim]: `qkv` Linear(dim, 3 dim,
  bias=qkv_bias), `proj` Linear(dim, dim); groups = num_heads."""

  def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x):
    if x.ndim < 3:
      raise ValueError(
          f"`x` must have shape [batch, *spatial, dim], got {x.shape}.")
    check_channels_last(x, self.qkv.in_features, x.ndim - 2)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = channel_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                            qkv[..., 2, :, :], scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
