"""HAT's overlapping cross-attention (OCAB; Chen et al. 2023, "Activating
More Pixels in Image Super-Resolution Transformer").

Queries come from non-overlapping `M x M` windows; keys/values from the
overlapping `Mo x Mo` windows centred on them, `Mo = M + int(M *
overlap_ratio)` (HAT: `F.unfold(kernel=Mo, stride=M, padding=(Mo - M) // 2)`).
Logits get a relative position bias from a `[(M + Mo - 1)^2, heads]` table
indexed by (query - key) + Mo - 1 in window coordinates (HAT's index; the key
window starts `(Mo - M) / 2` before the query window).

The window gathering is HaloNet's with halo `(Mo - M) / 2` (`halo.py`);
padded keys are masked (HAT attends to the zero padding), `key_mask
[B, H, W]` masks more, a query with nothing to attend to returns zeros.
Memory is linear in pixels.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial import halo as _halo
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial)

__all__ = ["overlapping_cross_attention",
           "overlapping_cross_attention_reference", "overlap_window_size",
           "OverlappingCrossAttention", "OVERLAPPING_CROSS_ATTENTION"]

OVERLAPPING_CROSS_ATTENTION = Op("spatial.overlapping_cross_attention")


def overlap_window_size(window_size: int, overlap_ratio: float) -> int:
  """HAT's `int(window_size * overlap_ratio) + window_size`."""
  mo = int(window_size * overlap_ratio) + window_size
  if (mo - window_size) % 2:
    raise ValueError(
        f"overlap window {mo} - window {window_size} must be even (HAT pads "
        f"(Mo - M) // 2 on each side); got overlap_ratio={overlap_ratio}.")
  return mo


def _check(query, key, value, window_size, overlap_size, rpb, key_mask):
  if not (isinstance(window_size, (int, np.integer)) and window_size >= 1):
    raise ValueError(f"`window_size` must be an int >= 1, got {window_size!r}.")
  if (not isinstance(overlap_size, (int, np.integer))
      or overlap_size < window_size or (overlap_size - window_size) % 2):
    raise ValueError(
        f"`overlap_size` must be an int >= window_size ({window_size}) with an"
        f" even difference, got {overlap_size!r}.")
  n, _, _ = _halo._check(query, key, value, window_size,
                         (overlap_size - window_size) // 2, None, None,
                         key_mask)
  t = window_size + overlap_size - 1
  if rpb is not None and tuple(rpb.shape) != (n, t, t):
    raise ValueError(
        f"`rpb` must have shape [heads, M+Mo-1, M+Mo-1]=({n}, {t}, {t}), got "
        f"{tuple(rpb.shape)}.")
  return n


def _window_bias(rpb, m, mo):
  """[N, M, M, Mo, Mo] from the [N, M+Mo-1, M+Mo-1] table."""
  d = np.arange(m)[:, None] - np.arange(mo)[None] + mo - 1     # [M, Mo]
  return rpb[:, d[:, None, :, None], d[None, :, None, :]]


def _xla(config, query, key, value, *, window_size, overlap_size, rpb,
         key_mask, scale):
  del config
  bias = None if rpb is None else _window_bias(rpb, window_size, overlap_size)
  h = (overlap_size - window_size) // 2
  return _halo._xla(None, query, key, value, block=(window_size,) * 2,
                    halo=(h, h), rel_h=None, rel_w=None, key_mask=key_mask,
                    scale=scale, window_bias=bias)


OVERLAPPING_CROSS_ATTENTION.register("xla", _xla)


def overlapping_cross_attention(query, key, value, window_size: int,
                                overlap_size: int, *, rpb=None, key_mask=None,
                                scale: Optional[float] = None,
                                implementation=None):
  """HAT OCAB attention.

  Args:
    query: [B, H, W, N, Hd]; key/value [B, H, W, K, Hd|Hv], N % K == 0.
    window_size: M (query windows); overlap_size: Mo (key windows),
      see `overlap_window_size`.
    rpb: optional [N, M+Mo-1, M+Mo-1] (query - key + Mo - 1).
    key_mask: optional bool [B, H, W].
    implementation: dispatch (`OVERLAPPING_CROSS_ATTENTION`: 'xla').
  Returns: [B, H, W, N, Hv] in query.dtype.
  """
  _check(query, key, value, window_size, overlap_size, rpb, key_mask)
  return OVERLAPPING_CROSS_ATTENTION(
      implementation, query, key, value, window_size=int(window_size),
      overlap_size=int(overlap_size), rpb=rpb, key_mask=key_mask,
      scale=default_scale(scale, query.shape[-1]))


def overlapping_cross_attention_reference(query, key, value, window_size,
                                          overlap_size, *, rpb=None,
                                          key_mask=None,
                                          scale: Optional[float] = None):
  """Dense attention with the OCAB mask and bias from pixel coordinates."""
  _check(query, key, value, window_size, overlap_size, rpb, key_mask)
  m, mo = window_size, overlap_size
  p = (mo - m) // 2
  b, h, w = query.shape[:3]
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ys, xs = ys.ravel(), xs.ravel()
  mask = np.ones((ys.size,) * 2, bool)
  idx = []
  for pos in (ys, xs):
    start = (pos // m) * m - p                      # key window start
    kin = pos[None, :] - start[:, None]             # key in window
    mask &= (kin >= 0) & (kin < mo)
    idx.append(np.clip((pos % m)[:, None] - kin + mo - 1, 0, m + mo - 2))
  mk = jnp.asarray(mask)[None, None]
  if key_mask is not None:
    mk = mk & key_mask.reshape(b, 1, 1, -1)
  bias = None if rpb is None else rpb[:, idx[0], idx[1]][None]
  out = dense_attention_reference(flatten_spatial(query), flatten_spatial(key),
                                  flatten_spatial(value), mk, bias,
                                  scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class OverlappingCrossAttention(HeadGated):
  """HAT's OCAB attention on [B, H, W, C]: `qkv` Linear(C, 3C,
  bias=qkv_bias), `relative_position_bias_table` [(M+Mo-1)^2, heads]
  (trunc-normal 0.02), `proj` Linear(C, C). (HAT's block adds LayerNorms, the
  residual and an MLP around this.)"""

  def __init__(self, dim: int, num_heads: int, window_size: int = 16, *,
               overlap_ratio: float = 0.5, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.window_size = window_size
    self.overlap_size = overlap_window_size(window_size, overlap_ratio)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    t = window_size + self.overlap_size - 1
    self.relative_position_bias_table = nnx.Param(
        nnx.initializers.truncated_normal(0.02)(rngs.params(),
                                                (t * t, num_heads),
                                                param_dtype))

  def relative_position_bias(self):
    t = self.window_size + self.overlap_size - 1
    return jnp.moveaxis(self.relative_position_bias_table[...].reshape(
        t, t, self.num_heads), -1, 0)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = overlapping_cross_attention(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
        self.window_size, self.overlap_size,
        rpb=self.relative_position_bias().astype(x.dtype), key_mask=key_mask,
        scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
