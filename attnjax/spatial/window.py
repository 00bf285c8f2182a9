"""Window attention (Swin), shifted windows, and MaxViT block / grid attention.

`window_attention(q, k, v, window_size, *, shift_size=0, rpb=None)`:
attention within non-overlapping windows (Swin W-MSA; MaxViT block
attention). With `shift_size` > 0 the map is cyclically shifted by
-shift_size first (Swin SW-MSA) and tokens that were not neighbours before
the shift (different "regions") are masked from each other; the output is
shifted back.

`grid_attention(q, k, v, grid_size, *, rpb=None)`: MaxViT grid attention.
Each axis of (padded) length L = G * m is viewed as [G, m]: the m windows
each hold the G x G tokens with the same position modulo m, i.e. a sparse,
dilated grid spanning the whole map.

Arbitrary resolutions: each axis is zero-padded at the end to a multiple of
the window (grid) size and the padded keys are masked, so padding never
changes the output at real positions (the original Swin/Twins code pads
with zeros but lets queries attend to them). Padding happens before the
cyclic shift, as in Swin. Windows larger than the input work (one padded
window).

Relative position bias `rpb` [heads, 2W_1 - 1, ..., 2W_n - 1] is indexed by
(query - key) + W - 1 within the window (Swin's convention; for grid
attention the offset is measured in grid cells). Swin stores the same table
flattened as [(2W_1 - 1)(2W_2 - 1), heads]; see
`WindowAttention.relative_position_bias`. `resize_relative_position_bias`
interpolates a table to a new window size (bicubic, as done when fine-tuning
Swin at a larger window).
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

__all__ = [
    "window_attention", "window_attention_reference", "grid_attention",
    "grid_attention_reference", "resize_relative_position_bias",
    "relative_position_index", "WindowAttention", "GridAttention",
]


def _check_rpb(rpb, n, window):
  want = (n,) + tuple(2 * w - 1 for w in window)
  if tuple(rpb.shape) != want:
    raise ValueError(
        f"`rpb` must have shape [heads, 2*window-1 per axis]={want}, got "
        f"{tuple(rpb.shape)}.")


def _region_labels(padded, window, shift):
  """Swin's region id of each shifted-frame position along one axis."""
  p = np.arange(padded)
  if shift == 0:
    return np.zeros(padded, np.int32)
  return np.where(p < padded - window, 0,
                  np.where(p < padded - shift, 1, 2)).astype(np.int32)


def _attend_windows(qw, kw, vw, mask, bias, scale, out_dtype):
  """qw [B, G, T, N, H], kw/vw [B, G, T, N, *]; mask [G|1, T, T]; bias [N,T,T]."""
  logits = jnp.einsum("bgqnh,bgknh->bgnqk", qw, kw,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)[None, None]
  m = None if mask is None else jnp.asarray(mask)[None, :, None]
  p = masked_softmax(logits, m)
  out = jnp.einsum("bgnqk,bgknh->bgqnh", p.astype(vw.dtype), vw,
                   preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def _bias_from_offsets(rpb, offsets):
  """rpb [N, 2W-1...]; offsets list of int arrays [T, T] (already + W - 1)."""
  return rpb[(slice(None),) + tuple(offsets)]


def window_attention(query, key, value, window_size, *, shift_size=0,
                     rpb=None, scale: Optional[float] = None):
  """Attention within (optionally shifted) non-overlapping windows.

  Args:
    query: [B, *spatial, N, H] (1-3 spatial dims); key/value [B, *spatial,
      K, H|Hv] with N % K == 0.
    window_size: int or per-axis tuple.
    shift_size: int or per-axis tuple, 0 <= shift < window (Swin uses
      window // 2 on every other block).
    rpb: optional [N, 2W_1 - 1, ...] relative position bias (query - key).
    scale: default 1/sqrt(H).
  Returns: [B, *spatial, N, Hv] in query.dtype.
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  win = to_tuple("window_size", window_size, nd)
  shift = to_tuple("shift_size", shift_size, nd, minimum=0)
  for a, (w, s) in enumerate(zip(win, shift)):
    if s >= w:
      raise ValueError(
          f"`shift_size` must be < `window_size` on every axis, got "
          f"shift_size={shift_size!r}, window_size={window_size!r}.")
  if rpb is not None:
    _check_rpb(rpb, n, win)
  scale = default_scale(scale, query.shape[-1])
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  spatial = tuple(query.shape[1:1 + nd])
  padded = tuple(-(-l // w) * w for l, w in zip(spatial, win))
  nw = tuple(p // w for p, w in zip(padded, win))
  b = query.shape[0]

  # Static per-token labels on the padded grid in the shifted frame:
  # region id (Swin SW-MSA mask) and validity (padding).
  valid = np.ones(padded, bool)
  region = np.zeros(padded, np.int64)
  for a in range(nd):
    pos = np.arange(padded[a])
    orig = (pos + shift[a]) % padded[a]   # roll by -shift: new[p] = old[p+s]
    shape = [1] * nd
    shape[a] = padded[a]
    valid = valid & (orig < spatial[a]).reshape(shape)
    region = region * 3 + _region_labels(padded[a], win[a], shift[a]).reshape(
        shape)

  def to_windows(x):
    pads = [(0, 0)] + [(0, p - l) for p, l in zip(padded, spatial)] + [(0, 0)] * 2
    x = jnp.pad(x, pads)
    if any(shift):
      x = jnp.roll(x, [-s for s in shift], axis=tuple(range(1, 1 + nd)))
    return _split(x, nd, nw, win, inner_last=True)

  def np_windows(x):
    return _split(x[None, ..., None, None], nd, nw, win,
                  inner_last=True).reshape(-1, int(np.prod(win)))

  qw, kw, vw = to_windows(query), to_windows(key), to_windows(value)
  t = int(np.prod(win))
  vl = np_windows(valid)
  rg = np_windows(region)
  mask = vl[:, None, :] & (rg[:, :, None] == rg[:, None, :])
  if not any(shift) and vl.all():
    mask = None
  bias = None
  if rpb is not None:
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in win], indexing="ij"),
                      -1).reshape(t, nd)
    offs = [coords[:, None, a] - coords[None, :, a] + win[a] - 1
            for a in range(nd)]
    bias = _bias_from_offsets(rpb, offs)
  out = _attend_windows(qw.reshape(b, -1, t, *qw.shape[-2:]),
                        kw.reshape(b, -1, t, *kw.shape[-2:]),
                        vw.reshape(b, -1, t, *vw.shape[-2:]), mask, bias,
                        scale, query.dtype)
  out = out.reshape(b, *nw, *win, n, value.shape[-1])
  out = _merge(out, nd, inner_last=True)
  if any(shift):
    out = jnp.roll(out, list(shift), axis=tuple(range(1, 1 + nd)))
  return out[(slice(None),) + tuple(slice(0, l) for l in spatial)]


def _split(x, nd, outer, inner, *, inner_last):
  """[B, *P, ...] -> [B, outer..., inner..., ...] (P = outer * inner).

  inner_last=True: position p = o * inner + i (contiguous windows);
  inner_last=False: position p = i * outer + o (grid: strided windows).
  """
  b, rest = x.shape[0], x.shape[1 + nd:]
  shape = [b]
  for o, i in zip(outer, inner):
    shape += [o, i] if inner_last else [i, o]
  x = x.reshape(*shape, *rest)
  o_ax = [1 + 2 * a + (0 if inner_last else 1) for a in range(nd)]
  i_ax = [1 + 2 * a + (1 if inner_last else 0) for a in range(nd)]
  return x.transpose([0] + o_ax + i_ax + list(range(1 + 2 * nd, x.ndim)))


def _merge(x, nd, *, inner_last):
  """Inverse of _split."""
  b = x.shape[0]
  outer, inner = x.shape[1:1 + nd], x.shape[1 + nd:1 + 2 * nd]
  perm = [0]
  for a in range(nd):
    perm += [1 + a, 1 + nd + a] if inner_last else [1 + nd + a, 1 + a]
  perm += list(range(1 + 2 * nd, x.ndim))
  x = x.transpose(perm)
  return x.reshape(b, *[o * i for o, i in zip(outer, inner)],
                   *x.shape[1 + 2 * nd:])


def grid_attention(query, key, value, grid_size, *, rpb=None,
                   scale: Optional[float] = None):
  """MaxViT grid attention: G x G tokens spaced L/G apart attend together.

  Args as `window_attention`, with `grid_size` (int or tuple) and rpb
  [N, 2G_1 - 1, ...] indexed by the grid-cell offset (query - key) + G - 1.
  Axes not divisible by G are padded to G * ceil(L / G) (masked keys).
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  grid = to_tuple("grid_size", grid_size, nd)
  if rpb is not None:
    _check_rpb(rpb, n, grid)
  scale = default_scale(scale, query.shape[-1])
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  spatial = tuple(query.shape[1:1 + nd])
  m = tuple(-(-l // g) for l, g in zip(spatial, grid))
  padded = tuple(g * mm for g, mm in zip(grid, m))
  b = query.shape[0]
  t = int(np.prod(grid))

  def to_windows(x):
    pads = [(0, 0)] + [(0, p - l) for p, l in zip(padded, spatial)] + [(0, 0)] * 2
    x = _split(jnp.pad(x, pads), nd, m, grid, inner_last=False)
    return x.reshape(b, -1, t, *x.shape[-2:])

  valid = np.ones(padded, bool)
  for a in range(nd):
    shape = [1] * nd
    shape[a] = padded[a]
    valid = valid & (np.arange(padded[a]) < spatial[a]).reshape(shape)
  vl = _split(valid[None, ..., None, None], nd, m, grid,
              inner_last=False).reshape(-1, t)
  mask = None if vl.all() else np.broadcast_to(vl[:, None, :], (vl.shape[0], t, t))
  bias = None
  if rpb is not None:
    coords = np.stack(np.meshgrid(*[np.arange(g) for g in grid], indexing="ij"),
                      -1).reshape(t, nd)
    offs = [coords[:, None, a] - coords[None, :, a] + grid[a] - 1
            for a in range(nd)]
    bias = _bias_from_offsets(rpb, offs)
  out = _attend_windows(to_windows(query), to_windows(key), to_windows(value),
                        mask, bias, scale, query.dtype)
  out = out.reshape(b, *m, *grid, n, value.shape[-1])
  out = _merge(out, nd, inner_last=False)
  return out[(slice(None),) + tuple(slice(0, l) for l in spatial)]


# ----------------------------------------------------------------------------
# References: dense [S, S] masks from token coordinates.
# ----------------------------------------------------------------------------


def _coords(spatial):
  return np.stack(np.meshgrid(*[np.arange(s) for s in spatial], indexing="ij"),
                  -1).reshape(-1, len(spatial))


def _dense_bias(rpb, rel):
  """rel int [S, S, nd] offsets already shifted to table indices."""
  return rpb.astype(jnp.float32)[(slice(None),) + tuple(
      rel[..., a] for a in range(rel.shape[-1]))][None]


def window_attention_reference(query, key, value, window_size, *,
                               shift_size=0, rpb=None, scale=None):
  """Dense masked attention: tokens attend iff, in the shifted padded frame,
  they share a window and a Swin region (plain jnp oracle)."""
  nd, n, _ = check_spatial_qkv(query, key, value)
  win = to_tuple("window_size", window_size, nd)
  shift = to_tuple("shift_size", shift_size, nd, minimum=0)
  spatial = tuple(query.shape[1:1 + nd])
  c = _coords(spatial)
  padded = np.array([-(-l // w) * w for l, w in zip(spatial, win)])
  w = np.array(win)
  s = np.array(shift)
  cs = (c - s) % padded                               # shifted-frame coords
  region = np.where(cs < padded - w, 0, np.where(cs < padded - s, 1, 2))
  region = np.where(s > 0, region, 0)
  same_win = ((cs[:, None] // w) == (cs[None] // w)).all(-1)
  same_reg = (region[:, None] == region[None]).all(-1)
  mask = same_win & same_reg
  bias = None
  if rpb is not None:
    _check_rpb(rpb, n, win)
    bias = _dense_bias(rpb, (cs % w)[:, None] - (cs % w)[None] + w - 1)
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      jnp.asarray(mask)[None, None], bias,
      scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def grid_attention_reference(query, key, value, grid_size, *, rpb=None,
                             scale=None):
  """Dense masked attention: tokens attend iff their coordinates agree modulo
  m = ceil(L / G) on every axis (plain jnp oracle)."""
  nd, n, _ = check_spatial_qkv(query, key, value)
  grid = np.array(to_tuple("grid_size", grid_size, nd))
  spatial = tuple(query.shape[1:1 + nd])
  m = -(-np.array(spatial) // grid)
  c = _coords(spatial)
  mask = ((c[:, None] % m) == (c[None] % m)).all(-1)
  bias = None
  if rpb is not None:
    _check_rpb(rpb, n, tuple(grid))
    bias = _dense_bias(rpb, (c // m)[:, None] - (c // m)[None] + grid - 1)
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      jnp.asarray(mask)[None, None], bias,
      scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


def relative_position_index(window_size) -> np.ndarray:
  """Swin's [T, T] index into the flattened [(2W_1-1)(2W_2-1)...] table."""
  win = tuple(window_size)
  c = _coords(win)
  rel = c[:, None] - c[None] + np.array(win) - 1
  idx = np.zeros(rel.shape[:2], np.int64)
  for a, w in enumerate(win):
    idx = idx * (2 * w - 1) + rel[..., a]
  return idx


def resize_relative_position_bias(rpb, new_window_size, method="bicubic"):
  """Interpolates rpb [N, 2W_1 - 1, ...] to [N, 2W'_1 - 1, ...].

  Bicubic resampling of the offset grid (what Swin fine-tuning at a larger
  window does to its tables); the identity when the size is unchanged.
  """
  nd = rpb.ndim - 1
  if nd < 1 or any(s % 2 == 0 for s in rpb.shape[1:]):
    raise ValueError(
        f"`rpb` must have shape [heads, 2W_1 - 1, ...] (odd offset-table "
        f"sizes), got {tuple(rpb.shape)}.")
  new = to_tuple("new_window_size", new_window_size, nd)
  shape = (rpb.shape[0],) + tuple(2 * w - 1 for w in new)
  if shape == tuple(rpb.shape):
    return rpb
  return jax.image.resize(rpb.astype(jnp.float32), shape,
                          method=method).astype(rpb.dtype)


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------


class WindowAttention(HeadGated):
  """Swin W-MSA / SW-MSA (and MaxViT block attention) on [B, H, W, C].

  Parameters as Swin's WindowAttention: `qkv` Linear(dim, 3 dim,
  bias=qkv_bias), `relative_position_bias_table` [(2Wh-1)(2Ww-1), heads]
  (Swin layout, trunc-normal(0.02) init), `proj` Linear(dim, dim).
  The cyclic shift happens inside (`shift_size`); as in Swin, no shift is
  applied when the whole map fits in one window. `resize_window` re-samples
  the table for a new window size.
  """

  partition = "window"

  def __init__(self, dim: int, num_heads: int, window_size=7, *,
               shift_size=0, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, use_rpb: bool = True,
               spatial_dims: int = 2, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.spatial_dims = spatial_dims
    self.window_size = to_tuple("window_size", window_size, spatial_dims)
    self.shift_size = to_tuple("shift_size", shift_size, spatial_dims,
                               minimum=0)
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    if use_rpb:
      size = int(np.prod([2 * w - 1 for w in self.window_size]))
      init = nnx.initializers.truncated_normal(0.02)
      self.relative_position_bias_table = nnx.Param(
          init(rngs.params(), (size, num_heads), param_dtype))
    else:
      self.relative_position_bias_table = None

  def relative_position_bias(self):
    """The table as [heads, 2Wh-1, 2Ww-1] (the `rpb` the primitives take)."""
    if self.relative_position_bias_table is None:
      return None
    t = self.relative_position_bias_table[...]
    return jnp.moveaxis(
        t.reshape(*[2 * w - 1 for w in self.window_size], self.num_heads), -1, 0)

  def resize_window(self, new_window_size):
    """Sets a new window size, bicubically resizing the bias table."""
    new = to_tuple("new_window_size", new_window_size, self.spatial_dims)
    if self.relative_position_bias_table is not None:
      rpb = resize_relative_position_bias(self.relative_position_bias(), new)
      self.relative_position_bias_table = nnx.Param(
          jnp.moveaxis(rpb, 0, -1).reshape(-1, self.num_heads))
    self.window_size = new
    self.shift_size = tuple(min(s, w - 1) for s, w in zip(self.shift_size, new))

  def _attend(self, q, k, v, spatial):
    shift = self.shift_size
    if all(l <= w for l, w in zip(spatial, self.window_size)):
      shift = (0,) * self.spatial_dims
    return window_attention(q, k, v, self.window_size, shift_size=shift,
                            rpb=self.relative_position_bias(), scale=self.scale)

  def __call__(self, x):
    nd = self.spatial_dims
    check_channels_last(x, self.qkv.in_features, nd)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = self._attend(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                       x.shape[1:1 + nd])
    return self.proj(self.gate_heads(out).reshape(x.shape))


class GridAttention(WindowAttention):
  """MaxViT grid attention on [B, H, W, C]: same parameters as
  WindowAttention (qkv, (2G-1)^2 x heads bias table, proj) with
  `window_size` read as the grid size G."""

  partition = "grid"

  def __init__(self, dim: int, num_heads: int, grid_size=7, **kwargs):
    super().__init__(dim, num_heads, grid_size, shift_size=0, **kwargs)

  def _attend(self, q, k, v, spatial):
    return grid_attention(q, k, v, self.window_size,
                          rpb=self.relative_position_bias(), scale=self.scale)
