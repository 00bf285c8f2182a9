"""Efficient local attention (ELA; Xu & Wan 2024, "ELA: Efficient Local
Attention for Deep Convolutional Neural Networks").

Strip-pooled row and column descriptors go through a shared depthwise 1D
conv, GroupNorm and a sigmoid; the input is rescaled by both:

    a_h = sigmoid(GN(conv1d(mean_W x)))   [B, H, C]
    a_w = sigmoid(GN(conv1d(mean_H x)))   [B, W, C]
    out = x * a_h[:, :, None] * a_w[:, None]

(depthwise conv without bias, zero 'same' padding; GroupNorm eps 1e-5 over
(channels of a group) x length, with per-channel affine). No keys, no masks.

`efficient_local_attention(x, kernel, gn_scale, gn_bias, num_groups)` on
[B, H, W, C] with `kernel` [k, C]; `EfficientLocalAttention` is the module
(ELA-B/S: k 7, 16 groups; ELA-T: k 5, 32 groups).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import check_channels_last, check_floating

__all__ = ["efficient_local_attention", "efficient_local_attention_reference",
           "EfficientLocalAttention", "EFFICIENT_LOCAL_ATTENTION"]

EFFICIENT_LOCAL_ATTENTION = Op("spatial.efficient_local_attention")


def _check(x, kernel, gn_scale, gn_bias, num_groups):
  check_floating("x", x)
  if x.ndim != 4:
    raise ValueError(f"`x` must be [B, H, W, C], got {tuple(x.shape)}.")
  c = x.shape[-1]
  if kernel.ndim != 2 or kernel.shape[1] != c or kernel.shape[0] % 2 == 0:
    raise ValueError(f"`kernel` must be [k, C={c}] with odd k, got "
                     f"{tuple(kernel.shape)}.")
  for name, a in (("gn_scale", gn_scale), ("gn_bias", gn_bias)):
    if tuple(a.shape) != (c,):
      raise ValueError(f"`{name}` must be [C]=({c},), got {tuple(a.shape)}.")
  if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
    raise ValueError(f"`num_groups` ({num_groups!r}) must divide C={c}.")


def _group_norm(y, scale, bias, groups, eps=1e-5):
  """y [B, L, C] float32; statistics over (L, channels of the group)."""
  b, l, c = y.shape
  g = y.reshape(b, l, groups, c // groups)
  mean = g.mean((1, 3), keepdims=True)
  var = ((g - mean) ** 2).mean((1, 3), keepdims=True)
  g = (g - mean) / jnp.sqrt(var + eps)
  return g.reshape(b, l, c) * scale + bias


def _gate(desc, kernel, scale, bias, groups, conv):
  return jax.nn.sigmoid(_group_norm(conv(desc, kernel), scale.astype(
      jnp.float32), bias.astype(jnp.float32), groups))


def _conv_xla(y, kernel):
  k, c = kernel.shape
  return jax.lax.conv_general_dilated(
      y, kernel.astype(jnp.float32)[:, None, :], (1,), [(k // 2, k // 2)],
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=c)


def _conv_ref(y, kernel):
  k = kernel.shape[0]
  l = y.shape[1]
  yp = jnp.pad(y, [(0, 0), (k // 2, k // 2), (0, 0)])
  return sum(yp[:, i:i + l] * kernel[i].astype(jnp.float32) for i in range(k))


def _ela(x, kernel, gn_scale, gn_bias, num_groups, conv):
  xf = x.astype(jnp.float32)
  a_h = _gate(xf.mean(2), kernel, gn_scale, gn_bias, num_groups, conv)
  a_w = _gate(xf.mean(1), kernel, gn_scale, gn_bias, num_groups, conv)
  return (xf * a_h[:, :, None] * a_w[:, None]).astype(x.dtype)


def _xla(config, x, kernel, gn_scale, gn_bias, *, num_groups):
  del config
  return _ela(x, kernel, gn_scale, gn_bias, num_groups, _conv_xla)


EFFICIENT_LOCAL_ATTENTION.register("xla", _xla)


def efficient_local_attention(x, kernel, gn_scale, gn_bias, num_groups: int,
                              *, implementation=None):
  """ELA on x [B, H, W, C]; `kernel` [k, C] depthwise; returns x.dtype."""
  _check(x, kernel, gn_scale, gn_bias, num_groups)
  return EFFICIENT_LOCAL_ATTENTION(implementation, x, kernel, gn_scale,
                                   gn_bias, num_groups=num_groups)


def efficient_local_attention_reference(x, kernel, gn_scale, gn_bias,
                                        num_groups: int):
  """Plain jnp (conv as shifted sums), float32."""
  _check(x, kernel, gn_scale, gn_bias, num_groups)
  return _ela(x, kernel, gn_scale, gn_bias, num_groups, _conv_ref)


class EfficientLocalAttention(nnx.Module):
  """ELA module on [B, H, W, C]: depthwise Conv1d `kernel` [k, C] (no
  bias, shared by rows and columns), GroupNorm(`num_groups`, C)."""

  def __init__(self, dim: int, kernel_size: int = 7, num_groups: int = 16, *,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_groups or kernel_size % 2 == 0:
      raise ValueError(f"`num_groups` ({num_groups}) must divide `dim` "
                       f"({dim}) and `kernel_size` ({kernel_size}) be odd.")
    self.dim, self.num_groups = dim, num_groups
    b = 1.0 / kernel_size ** 0.5
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (kernel_size, dim), param_dtype, -b, b))
    self.gn_scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.gn_bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x):
    check_channels_last(x, self.dim, 2)
    return efficient_local_attention(x, self.kernel[...], self.gn_scale[...],
                                     self.gn_bias[...], self.num_groups)
