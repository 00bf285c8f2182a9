"""Axial attention (Ho et al. 2019; Axial-DeepLab, Wang et al. 2020).

`axial_attention(q, k, v, axis)`: every token attends to the tokens that
share all its coordinates except `axis` (a row or a column in 2D),
optionally causally along that axis. `AxialAttention` composes one
attention per spatial axis, each with its own projections, either
sequentially (Axial-DeepLab: height then width) or summed over axes
(Axial Transformer style).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     masked_softmax, repeat_kv)

__all__ = ["axial_attention", "axial_attention_reference", "AxialAttention"]


def _check_axis(axis, nd):
  if not isinstance(axis, (int, np.integer)) or not -nd <= axis < nd:
    raise ValueError(
        f"`axis` must be a spatial axis in [{-nd}, {nd}), got {axis!r}.")
  return int(axis) % nd


def axial_attention(query, key, value, axis: int, *, is_causal: bool = False,
                    scale: Optional[float] = None):
  """Attention along one spatial axis of [B, *spatial, N, H] inputs.

  `axis` counts spatial axes (0 = first spatial dim). Returns
  [B, *spatial, N, Hv] in query.dtype.
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  axis = _check_axis(axis, nd)
  scale = default_scale(scale, query.shape[-1])
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  src = 1 + axis
  q, k, v = (jnp.moveaxis(x, src, -3) for x in (query, key, value))
  logits = jnp.einsum("...qnh,...knh->...nqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  mask = None
  if is_causal:
    length = q.shape[-3]
    mask = jnp.asarray(np.tril(np.ones((length, length), bool)))
  p = masked_softmax(logits, mask)
  out = jnp.einsum("...nqk,...knh->...qnh", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return jnp.moveaxis(out, -3, src)


def axial_attention_reference(query, key, value, axis: int, *,
                              is_causal: bool = False, scale=None):
  """Dense masked attention: attend iff all other coordinates agree."""
  nd, _, _ = check_spatial_qkv(query, key, value)
  axis = _check_axis(axis, nd)
  spatial = query.shape[1:1 + nd]
  c = np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"),
               -1).reshape(-1, nd)
  others = [a for a in range(nd) if a != axis]
  mask = (c[:, None, others] == c[None, :, others]).all(-1)
  if is_causal:
    mask &= c[None, :, axis] <= c[:, None, axis]
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      jnp.asarray(mask)[None, None], None,
      scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class _AxisAttention(HeadGated):
  def __init__(self, dim, num_heads, qkv_bias, dtype, param_dtype, rngs):
    self.num_heads = num_heads
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)


class AxialAttention(nnx.Module):
  """Axial attention layer on channels-last maps [B, *spatial, dim].

  One attention per spatial axis, each with `qkv` Linear(dim, 3 dim) and
  `proj` Linear(dim, dim) (so 2 * (4 dim^2 + 4 dim) parameters in 2D).
  combine='sequential': x -> attn_axis0(x) -> attn_axis1(...) (Axial-DeepLab
  order, height then width); combine='sum': sum over axes of attn_axis(x).
  `is_causal` applies along every axis (raster-order generation in the Axial
  Transformer needs additional shifting that lives in the model).
  """

  def __init__(self, dim: int, num_heads: int, *, spatial_dims: int = 2,
               combine: str = "sequential", is_causal: bool = False,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if combine not in ("sequential", "sum"):
      raise ValueError(
          f"`combine` must be 'sequential' or 'sum', got {combine!r}.")
    self.spatial_dims = spatial_dims
    self.combine = combine
    self.is_causal = is_causal
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.axes = nnx.List([
        _AxisAttention(dim, num_heads, qkv_bias, dtype, param_dtype, rngs)
        for _ in range(spatial_dims)])

  def _one(self, layer, x, axis):
    qkv = layer.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = axial_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                          qkv[..., 2, :, :], axis, is_causal=self.is_causal,
                          scale=self.scale)
    return layer.proj(layer.gate_heads(out).reshape(x.shape))

  def __call__(self, x):
    nd = self.spatial_dims
    check_channels_last(x, self.axes[0].qkv.in_features, nd)
    if self.combine == "sequential":
      for a, layer in enumerate(self.axes):
        x = self._one(layer, x, a)
      return x
    return sum(self._one(layer, x, a) for a, layer in enumerate(self.axes))
