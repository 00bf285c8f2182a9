"""3D (shifted) window attention over volumes and video: Video Swin
Transformer (Liu et al. 2022) W-MSA / SW-MSA on [B, D, H, W, ...].

`window_attention_3d(q, k, v, window_size, *, shift_size=0, rpb=None,
key_mask=None)`: tokens attend within non-overlapping `Wd x Wh x Ww` windows
of the map zero-padded at the end to a multiple of the window. With a shift,
the padded map is cyclically rolled by `-shift` (Video Swin's
`torch.roll(x, -shift)`), and inside a window only tokens of the same
region attend to each other, the regions of each axis being the slices
`[0, P - w)`, `[P - w, P - s)`, `[P - s, P)` of the rolled frame (Video
Swin's `compute_mask`). Padded keys are masked (Video Swin lets queries
attend to the zero padding); `key_mask [B, D, H, W]` masks more keys; a query
with nothing to attend to returns zeros.

`rpb [N, 2Wd-1, 2Wh-1, 2Ww-1]` is indexed by query - key + W - 1 (Video
Swin's table, reshaped). `video_window_size(input, window, shift)` is Video
Swin's `get_window_size`: on an axis where the input is not larger than the
window, the window becomes the input size and the shift 0.
`WindowAttention3D` is the layer on [B, D, H, W, C]; when the window shrinks
it uses the central part of its bias table (the true offsets; Video Swin
slices `relative_position_index[:N, :N]`, which equals this only when just
the depth axis shrinks).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     check_spatial_qkv, default_scale,
                                     dense_attention_reference,
                                     flatten_spatial, masked_softmax,
                                     merge_windows, partition_windows,
                                     repeat_kv, to_tuple)

__all__ = ["window_attention_3d", "window_attention_3d_reference",
           "window_3d_mask", "video_window_size", "WindowAttention3D",
           "WINDOW_ATTENTION_3D"]

WINDOW_ATTENTION_3D = Op("spatial.window_attention_3d")


def video_window_size(input_size, window_size, shift_size=0):
  """Video Swin's get_window_size: per axis, input <= window -> (input, 0)."""
  inp = to_tuple("input_size", input_size, 3)
  win = to_tuple("window_size", window_size, 3)
  shift = to_tuple("shift_size", shift_size, 3, minimum=0)
  w = tuple(i if i <= x else x for i, x in zip(inp, win))
  s = tuple(0 if i <= x else y for i, x, y in zip(inp, win, shift))
  return w, s


def _check(query, key, value, window_size, shift_size, rpb, key_mask):
  _, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(3,))
  win = to_tuple("window_size", window_size, 3)
  shift = to_tuple("shift_size", shift_size, 3, minimum=0)
  if any(s >= w for s, w in zip(shift, win)):
    raise ValueError(
        f"`shift_size` must be < `window_size` on every axis, got "
        f"shift_size={shift}, window_size={win}.")
  if rpb is not None:
    want = (n,) + tuple(2 * w - 1 for w in win)
    if tuple(rpb.shape) != want:
      raise ValueError(f"`rpb` must have shape [heads, 2*window-1 per axis]="
                       f"{want}, got {tuple(rpb.shape)}.")
  if key_mask is not None:
    want = tuple(query.shape[:4])
    if tuple(key_mask.shape) != want or key_mask.dtype != jnp.bool_:
      raise ValueError(f"`key_mask` must be bool [batch, D, H, W]={want}, got "
                       f"{tuple(key_mask.shape)} {key_mask.dtype}.")
  return n, win, shift


def _labels(spatial, win, shift):
  """Padded shape, and per padded position (original frame): window id,
  region id, validity (numpy, [*padded])."""
  padded = tuple(-(-l // w) * w for l, w in zip(spatial, win))
  wid = np.zeros(padded, np.int64)
  reg = np.zeros(padded, np.int64)
  valid = np.ones(padded, bool)
  for a in range(3):
    p = np.arange(padded[a])
    r = (p - shift[a]) % padded[a]             # position in the rolled frame
    lab = np.where(r < padded[a] - win[a], 0,
                   np.where(r < padded[a] - shift[a], 1, 2)) if shift[a] else 0 * r
    shape = [1, 1, 1]
    shape[a] = padded[a]
    wid = wid * (padded[a] // win[a]) + (r // win[a]).reshape(shape)
    reg = reg * 3 + lab.reshape(shape)
    valid = valid & (p < spatial[a]).reshape(shape)
  return padded, wid, reg, valid


def window_3d_mask(spatial_shape, window_size, shift_size=0):
  """Dense bool [S, S] mask (query, key) over the D*H*W tokens."""
  spatial = to_tuple("spatial_shape", spatial_shape, 3)
  win = to_tuple("window_size", window_size, 3)
  shift = to_tuple("shift_size", shift_size, 3, minimum=0)
  _, wid, reg, _ = _labels(spatial, win, shift)
  sl = tuple(slice(0, l) for l in spatial)
  wid, reg = wid[sl].ravel(), reg[sl].ravel()
  return (wid[:, None] == wid[None]) & (reg[:, None] == reg[None])


def _xla(config, query, key, value, *, win, shift, rpb, key_mask, scale):
  del config
  b, n = query.shape[0], query.shape[-2]
  spatial = tuple(query.shape[1:4])
  padded, _, reg, valid = _labels(spatial, win, shift)
  if key_mask is not None:
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  pads = [(0, 0)] + [(0, p - l) for p, l in zip(padded, spatial)]
  t = int(np.prod(win))

  def to_windows(x, np_=False):
    if np_:
      x = np.roll(x, [-s for s in shift], axis=(1, 2, 3))
      return partition_windows(x, win).reshape(x.shape[0], -1, t,
                                               *x.shape[4:])
    x = jnp.pad(x, pads + [(0, 0)] * (x.ndim - 4))
    x = jnp.roll(x, [-s for s in shift], axis=(1, 2, 3))
    return partition_windows(x, win).reshape(b, -1, t, *x.shape[4:])

  qw, kw, vw = (to_windows(x) for x in (query, key, value))
  rg = to_windows(reg[None], True)[0]          # [G, T]
  vl = to_windows(valid[None], True)[0]
  ok = jnp.asarray(vl[:, None, :] & (rg[:, :, None] == rg[:, None, :]))[None]
  if key_mask is not None:
    ok = ok & to_windows(key_mask)[:, :, None, :]
  logits = jnp.einsum("bgtnh,bgsnh->bgnts", qw, kw,
                      preferred_element_type=jnp.float32) * scale
  if rpb is not None:
    c = np.stack(np.meshgrid(*[np.arange(w) for w in win], indexing="ij"),
                 -1).reshape(t, 3)
    off = [c[:, None, a] - c[None, :, a] + win[a] - 1 for a in range(3)]
    logits = logits + rpb.astype(jnp.float32)[(slice(None),) + tuple(off)]
  p = masked_softmax(logits, ok[:, :, None])
  out = jnp.einsum("bgnts,bgsnh->bgtnh", p.astype(vw.dtype), vw,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  nw = tuple(p_ // w for p_, w in zip(padded, win))
  out = merge_windows(out.reshape(b, *nw, *win, n, -1), 3)
  out = jnp.roll(out, list(shift), axis=(1, 2, 3))
  return out[:, :spatial[0], :spatial[1], :spatial[2]]


WINDOW_ATTENTION_3D.register("xla", _xla)


def window_attention_3d(query, key, value, window_size, *, shift_size=0,
                        rpb=None, key_mask=None, scale: Optional[float] = None,
                        implementation=None):
  """Video Swin (shifted) 3D window attention.

  Args:
    query: [B, D, H, W, N, Hd]; key/value [B, D, H, W, K, Hd|Hv], N % K == 0.
    window_size: int or (Wd, Wh, Ww).
    shift_size: int or per-axis, 0 <= shift < window.
    rpb: optional [N, 2Wd-1, 2Wh-1, 2Ww-1] (query - key + W - 1).
    key_mask: optional bool [B, D, H, W], True = may be attended.
    implementation: dispatch (`WINDOW_ATTENTION_3D`: 'xla').
  Returns: [B, D, H, W, N, Hv] in query.dtype.
  """
  n, win, shift = _check(query, key, value, window_size, shift_size, rpb,
                         key_mask)
  return WINDOW_ATTENTION_3D(implementation, query, key, value, win=win,
                             shift=shift, rpb=rpb, key_mask=key_mask,
                             scale=default_scale(scale, query.shape[-1]))


def window_attention_3d_reference(query, key, value, window_size, *,
                                  shift_size=0, rpb=None, key_mask=None,
                                  scale: Optional[float] = None):
  """Dense attention with `window_3d_mask` and the bias gathered from token
  coordinates (materializes [S, S])."""
  n, win, shift = _check(query, key, value, window_size, shift_size, rpb,
                         key_mask)
  spatial = tuple(query.shape[1:4])
  mask = jnp.asarray(window_3d_mask(spatial, win, shift))[None, None]
  if key_mask is not None:
    mask = mask & key_mask.reshape(query.shape[0], 1, 1, -1)
  bias = None
  if rpb is not None:
    c = np.stack(np.meshgrid(*[np.arange(l) for l in spatial], indexing="ij"),
                 -1).reshape(-1, 3)
    # query - key offsets; pairs outside one window are masked, so clip.
    off = [np.clip(c[:, None, a] - c[None, :, a] + win[a] - 1, 0,
                   2 * win[a] - 2) for a in range(3)]
    bias = rpb[(slice(None),) + tuple(off)][None]
  out = dense_attention_reference(flatten_spatial(query), flatten_spatial(key),
                                  flatten_spatial(value), mask, bias,
                                  scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class WindowAttention3D(HeadGated):
  """Video Swin's WindowAttention3D (+ the block's shift) on [B, D, H, W, C].

  `qkv` Linear(dim, 3 dim, bias=qkv_bias), `relative_position_bias_table`
  [(2Wd-1)(2Wh-1)(2Ww-1), heads] (trunc-normal 0.02), `proj` Linear(dim,
  dim). The window/shift follow `video_window_size` for each input; defaults
  are Video Swin-T's (8, 7, 7) windows.
  """

  def __init__(self, dim: int, num_heads: int, window_size=(8, 7, 7), *,
               shift_size=0, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.window_size = to_tuple("window_size", window_size, 3)
    self.shift_size = to_tuple("shift_size", shift_size, 3, minimum=0)
    if any(s >= w for s, w in zip(self.shift_size, self.window_size)):
      raise ValueError(f"`shift_size` {self.shift_size} must be < "
                       f"`window_size` {self.window_size} on every axis.")
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    size = int(np.prod([2 * w - 1 for w in self.window_size]))
    self.relative_position_bias_table = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(),
                                                (size, num_heads), param_dtype))

  def relative_position_bias(self, window=None):
    """[heads, 2Wd-1, 2Wh-1, 2Ww-1], cropped centrally to `window`."""
    full = self.window_size
    t = self.relative_position_bias_table[...]
    t = jnp.moveaxis(t.reshape(*[2 * w - 1 for w in full], self.num_heads),
                     -1, 0)
    if window is None:
      return t
    return t[(slice(None),) + tuple(slice(f - w, f + w - 1)
                                    for f, w in zip(full, window))]

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 3)
    win, shift = video_window_size(x.shape[1:4], self.window_size,
                                   self.shift_size)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = window_attention_3d(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], win,
        shift_size=shift, rpb=self.relative_position_bias(win).astype(x.dtype),
        key_mask=key_mask, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
