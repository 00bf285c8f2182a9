"""Cross-shaped window attention (CSWin Transformer, Dong et al. 2022).

The heads are split in two halves. Following the official implementation's
branch order, the first half attends within vertical stripes (windows of
full height x `stripe_width` columns) and the second half within horizontal
stripes (`stripe_width` rows x full width); together each token sees a cross.
Each branch adds the locally-enhanced positional encoding (LePE): a
depthwise convolution of V computed inside the same stripe window (zero
padding at the stripe borders), added to the attention output.

Widths not divisible by the stripe width are zero-padded at the end and the
padded keys masked (the padded V entries are zeros for LePE too).
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
                                     repeat_kv)
from attnjax.spatial.window import _merge, _split, window_attention

__all__ = ["stripe_attention", "cross_shaped_window_attention",
           "cross_shaped_window_attention_reference", "CSWinAttention"]


def _stripe_window(spatial, stripe_width, orientation):
  h, w = spatial
  if orientation == "vertical":
    return (h, stripe_width)
  if orientation == "horizontal":
    return (stripe_width, w)
  if orientation == "full":
    return (h, w)
  raise ValueError(
      f"`orientation` must be 'vertical', 'horizontal' or 'full', got "
      f"{orientation!r}.")


def _check_map(query):
  if any(s == 0 for s in query.shape[1:3]):
    raise ValueError(
        f"`query` has an empty feature map: shape {tuple(query.shape)} "
        "([batch, H, W, heads, head_dim] with H, W >= 1).")


def _check_lepe(lepe_kernel, lepe_bias, n, dv):
  """LePE kernel [kh, kw, n, dv] with odd kh, kw (a centred 'SAME' conv:
  an even kernel has no centre, so it is refused) and bias [n, dv]."""
  want = (n, dv)
  shape = tuple(jnp.shape(lepe_kernel))
  if len(shape) != 4 or shape[2:] != want:
    raise ValueError(
        f"`lepe_kernel` must have shape [kh, kw, heads, head_dim_v]="
        f"[kh, kw, {want[0]}, {want[1]}], got {shape}.")
  if any(k < 1 or k % 2 == 0 for k in shape[:2]):
    raise ValueError(
        f"`lepe_kernel` sizes must be odd and >= 1 (a centred depthwise "
        f"conv), got {shape[:2]}.")
  if lepe_bias is not None and tuple(jnp.shape(lepe_bias)) != want:
    raise ValueError(
        f"`lepe_bias` must have shape [heads, head_dim_v]={list(want)}, got "
        f"{tuple(jnp.shape(lepe_bias))}.")


def _windowed_depthwise(v, window, kernel, bias):
  """Depthwise conv of v [B, H, W, N, D] within each window (zero borders).

  kernel [kh, kw, N, D], bias [N, D] or None.
  """
  b, h, w, n, d = v.shape
  padded = tuple(-(-l // ww) * ww for l, ww in zip((h, w), window))
  nw = tuple(p // ww for p, ww in zip(padded, window))
  x = jnp.pad(v, [(0, 0), (0, padded[0] - h), (0, padded[1] - w), (0, 0), (0, 0)])
  x = _split(x, 2, nw, window, inner_last=True)           # [B, nh, nw, wh, ww, N, D]
  x = x.reshape(-1, *window, n * d)
  out = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel.reshape(*kernel.shape[:2], 1, n * d).astype(
          jnp.float32), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=n * d)
  if bias is not None:
    out = out + bias.reshape(1, 1, 1, n * d).astype(jnp.float32)
  out = out.reshape(b, *nw, *window, n, d)
  out = _merge(out, 2, inner_last=True)
  return out[:, :h, :w].astype(v.dtype)


def stripe_attention(query, key, value, stripe_width: int, orientation: str, *,
                     scale: Optional[float] = None, lepe_kernel=None,
                     lepe_bias=None):
  """One CSWin branch on [B, H, W, N, D]: attention within stripes + LePE.

  orientation: 'vertical' (full-height stripes `stripe_width` wide),
  'horizontal' (`stripe_width` tall, full width) or 'full' (the whole map,
  CSWin's last stage). lepe_kernel [kh, kw, N, Dv] / lepe_bias [N, Dv]:
  optional depthwise conv of V inside the same window.
  """
  nd, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(2,))
  _check_map(query)
  if lepe_kernel is None and lepe_bias is not None:
    raise ValueError("`lepe_bias` given without `lepe_kernel`.")
  if (isinstance(stripe_width, (bool, np.bool_)) or
      not isinstance(stripe_width, (int, np.integer)) or stripe_width < 1):
    raise ValueError(f"`stripe_width` must be a positive int, got {stripe_width!r}.")
  window = _stripe_window(query.shape[1:3], int(stripe_width), orientation)
  out = window_attention(query, key, value, window, scale=scale)
  if lepe_kernel is not None:
    _check_lepe(lepe_kernel, lepe_bias, n, value.shape[-1])
    v = repeat_kv(value, n)
    out = out + _windowed_depthwise(v, window, lepe_kernel, lepe_bias)
  return out


def cross_shaped_window_attention(query, key, value, stripe_width: int, *,
                                  scale: Optional[float] = None,
                                  lepe_kernel=None, lepe_bias=None):
  """CSWin attention on [B, H, W, N, D] (N even): heads [:N/2] vertical
  stripes, heads [N/2:] horizontal stripes; optional LePE per head
  (lepe_kernel [kh, kw, N, Dv], lepe_bias [N, Dv])."""
  nd, n, kh = check_spatial_qkv(query, key, value, spatial_dims=(2,))
  if n % 2 or kh != n:
    raise ValueError(
        f"cross-shaped attention splits heads in two halves: `query` and "
        f"`key`/`value` need the same even number of heads, got shapes "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
  half = n // 2
  outs = []
  for sl, orient in ((slice(0, half), "vertical"),
                     (slice(half, n), "horizontal")):
    lk = None if lepe_kernel is None else lepe_kernel[:, :, sl]
    lb = None if lepe_bias is None else lepe_bias[sl]
    outs.append(stripe_attention(query[..., sl, :], key[..., sl, :],
                                 value[..., sl, :], stripe_width, orient,
                                 scale=scale, lepe_kernel=lk, lepe_bias=lb))
  return jnp.concatenate(outs, axis=-2)


def cross_shaped_window_attention_reference(query, key, value, stripe_width,
                                            *, scale=None, lepe_kernel=None,
                                            lepe_bias=None):
  """Dense masked attention per half + LePE by explicit neighbour sums."""
  check_spatial_qkv(query, key, value, spatial_dims=(2,))
  _check_map(query)
  b, h, w, n, d = query.shape
  if lepe_kernel is not None:
    _check_lepe(lepe_kernel, lepe_bias, n, value.shape[-1])
  half = n // 2
  c = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"),
               -1).reshape(-1, 2)
  sw = stripe_width
  vert = (c[:, None, 1] // sw) == (c[None, :, 1] // sw)     # same column band
  horz = (c[:, None, 0] // sw) == (c[None, :, 0] // sw)     # same row band
  mask = np.concatenate([np.broadcast_to(vert, (half,) + vert.shape),
                         np.broadcast_to(horz, (n - half,) + horz.shape)])
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      jnp.asarray(mask)[None], None, scale=default_scale(scale, d))
  out = out.reshape(query.shape[:-1] + value.shape[-1:]).astype(jnp.float32)
  if lepe_kernel is not None:
    kh, kw = lepe_kernel.shape[:2]
    band = np.concatenate([np.broadcast_to(c[:, 1] // sw, (half, h * w)),
                           np.broadcast_to(c[:, 0] // sw, (n - half, h * w))]
                          ).reshape(n, h, w)
    v = value.astype(jnp.float32)
    lepe = jnp.zeros_like(v)
    for i in range(kh):
      for j in range(kw):
        dy, dx = i - kh // 2, j - kw // 2
        ys, xs = np.arange(h) + dy, np.arange(w) + dx
        ok = (((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None])
        yc, xc = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
        same = band[:, yc][:, :, xc] == band                      # [n, h, w]
        keep = (ok[None] & same).transpose(1, 2, 0)[None, ..., None]
        lepe = lepe + jnp.where(keep, v[:, yc][:, :, xc], 0.0) * lepe_kernel[i, j]
    if lepe_bias is not None:
      lepe = lepe + lepe_bias
    out = out + lepe
  return out.astype(query.dtype)


class CSWinAttention(HeadGated):
  """CSWin attention layer on [B, H, W, dim].

  Parameters as CSWin's block attention: `qkv` Linear(dim, 3 dim,
  bias=qkv_bias), `proj` Linear(dim, dim), and the LePE depthwise 3x3 convs
  (`lepe_kernel` [3, 3, dim], `lepe_bias` [dim]: one conv of dim/2 channels
  per branch, or one of dim channels in the last stage). `last_stage=True`
  is CSWin's single full-attention branch.
  """

  def __init__(self, dim: int, num_heads: int, stripe_width: int = 7, *,
               last_stage: bool = False, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, lepe_kernel_size: int = 3,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    if not last_stage and num_heads % 2:
      raise ValueError(
          f"`num_heads` ({num_heads}) must be even unless last_stage (half "
          f"the heads take horizontal stripes, half vertical).")
    if (isinstance(lepe_kernel_size, (bool, np.bool_)) or
        not isinstance(lepe_kernel_size, (int, np.integer)) or
        lepe_kernel_size < 1 or lepe_kernel_size % 2 == 0):
      raise ValueError(
          f"`lepe_kernel_size` must be an odd positive int (a centred "
          f"depthwise conv), got {lepe_kernel_size!r}.")
    if (isinstance(stripe_width, (bool, np.bool_)) or
        not isinstance(stripe_width, (int, np.integer)) or stripe_width < 1):
      raise ValueError(
          f"`stripe_width` must be a positive int, got {stripe_width!r}.")
    self.num_heads = num_heads
    self.stripe_width = int(stripe_width)
    self.last_stage = last_stage
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    ks = int(lepe_kernel_size)
    # LeCun-normal for a depthwise kernel (fan_in = ks * ks).
    self.lepe_kernel = nnx.Param(
        jax.random.normal(rngs.params(), (ks, ks, dim), param_dtype) / ks)
    self.lepe_bias = nnx.Param(jnp.zeros((dim,), param_dtype))

  def __call__(self, x):
    check_channels_last(x, self.qkv.in_features, 2)
    n, d = self.num_heads, self.head_dim
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, n, d)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    lk = self.lepe_kernel[...].reshape(*self.lepe_kernel.shape[:2], n, d)
    lb = self.lepe_bias[...].reshape(n, d)
    if self.last_stage:
      out = stripe_attention(q, k, v, 1, "full", scale=self.scale,
                             lepe_kernel=lk, lepe_bias=lb)
    else:
      out = cross_shaped_window_attention(q, k, v, self.stripe_width,
                                          scale=self.scale, lepe_kernel=lk,
                                          lepe_bias=lb)
    return self.proj(self.gate_heads(out).reshape(x.shape))
