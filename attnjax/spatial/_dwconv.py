"""Depthwise 2D convolution helpers for the convolutional attention-like
mixers of the spatial zoo (VAN LKA, FocalNet, ELA, ...) and the strided
depthwise spatial reduction of S2AFormer's Strip Self-Attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _bias4(bias):
  """[C] -> float32 [1, 1, 1, C] (explicit rank: no implicit promotion)."""
  return bias.astype(jnp.float32).reshape(1, 1, 1, -1)


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
  return out if bias is None else out + _bias4(bias)


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
  return out if bias is None else out + _bias4(bias)


def _strided_pads(size, kernel, stride):
  """End padding so a VALID conv gives ceil(size / stride) outputs."""
  out = -(-size // stride)
  return max(0, (out - 1) * stride + kernel - size)


def strided_depthwise_conv2d(x, kernel, bias=None, *, stride):
  """Depthwise conv with stride `stride` (int or pair) for spatial reduction:
  x [B, H, W, C], kernel [kh, kw, C] (any sizes), bias [C]. The map is
  zero-padded at the end so that the output is [B, ceil(H / sh),
  ceil(W / sw), C]: output (i, j) sums kernel * x over rows i*sh .. i*sh+kh-1
  and columns j*sw .. j*sw+kw-1 (kernel == stride: non-overlapping patches).
  Accumulates in float32, returns float32."""
  sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
  kh, kw, c = kernel.shape
  pads = [(0, _strided_pads(x.shape[1], kh, sh)),
          (0, _strided_pads(x.shape[2], kw, sw))]
  out = jax.lax.conv_general_dilated(
      x, kernel.reshape(kh, kw, 1, c).astype(x.dtype), (sh, sw), pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      preferred_element_type=jnp.float32)
  return out if bias is None else out + _bias4(bias)


def strided_depthwise_conv2d_reference(x, kernel, bias=None, *, stride):
  """The same convolution as a sum of strided slices of the zero-padded map
  (plain jnp, float32)."""
  sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
  kh, kw, _ = kernel.shape
  h, w = x.shape[1:3]
  oh, ow = -(-h // sh), -(-w // sw)
  xp = jnp.pad(x.astype(jnp.float32),
               [(0, 0), (0, _strided_pads(h, kh, sh)),
                (0, _strided_pads(w, kw, sw)), (0, 0)])
  out = sum(xp[:, i:i + (oh - 1) * sh + 1:sh, j:j + (ow - 1) * sw + 1:sw]
            * kernel[i, j].astype(jnp.float32)
            for i in range(kh) for j in range(kw))
  return out if bias is None else out + _bias4(bias)
