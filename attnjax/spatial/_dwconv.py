"""Depthwise 2D convolution helpers for the convolutional attention-like
mixers of the spatial zoo (VAN LKA, FocalNet, ELA, ...)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def depthwise_conv2d(x, kernel, bias=None, *, dilation=1):
  """'same' depthwise conv, zero padding: x [B, H, W, C], kernel [kh, kw, C]
  (odd sizes), bias [C]. Accumulates in float32, returns float32."""
  kh, kw, c = kernel.shape
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  out = jax.lax.conv_general_dilated(
      x, kernel.reshape(kh, kw, 1, c).astype(x.dtype), (1, 1),
      [(ph, ph), (pw, pw)], rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      preferred_element_type=jnp.float32)
  return out if bias is None else out + bias.astype(jnp.float32)


def depthwise_conv2d_reference(x, kernel, bias=None, *, dilation=1):
  """The same convolution as a sum of shifted, zero-padded copies (plain jnp,
  float32): out[y, x] = sum_ij kernel[i, j] * x[y + d(i - kh//2), ...]."""
  kh, kw, _ = kernel.shape
  h, w = x.shape[1:3]
  ph, pw = dilation * (kh // 2), dilation * (kw // 2)
  xp = jnp.pad(x.astype(jnp.float32), [(0, 0), (ph, ph), (pw, pw), (0, 0)])
  out = sum(xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
            * kernel[i, j].astype(jnp.float32)
            for i in range(kh) for j in range(kw))
  return out if bias is None else out + bias.astype(jnp.float32)
