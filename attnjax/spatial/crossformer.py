"""CrossFormer (Wang et al. 2022, "CrossFormer: A Versatile Vision Transformer
Hinging on Cross-scale Attention"): long- and short-distance attention
(LSDA) and the cross-scale embedding layer (CEL).

* SDA (short distance): tokens attend within non-overlapping `G x G` groups
  of adjacent pixels (`p // G` equal per axis).
* LDA (long distance): tokens sampled with a fixed interval `I` form a group
  (`p % I` equal per axis): each group is a dilated `ceil(H/I) x ceil(W/I)`
  grid spanning the whole map.

`lsda_attention(q, k, v, size, *, mode='sda'|'lda', rpb=None, key_mask=None)`
on [B, H, W, N, Hd]; `size` is G for SDA and I for LDA. Each axis is
zero-padded at the end to a multiple of `size` and padded keys are masked
(CrossFormer pads and attends to the padding; CrossFormer++ masks it).
`rpb [N, 2g_h - 1, 2g_w - 1]` is indexed by (query - key) in-group index +
g - 1, where g is the group's extent (G for SDA, ceil(L/I) for LDA);
CrossFormer makes it with the dynamic position bias MLP (`DynamicPosBias`)
from the offsets. A query with nothing to attend to returns zeros.

`CrossScaleEmbedding` is CEL: convolutions with several kernel sizes (e.g.
4, 8, 16, 32) and one stride, concatenated along channels (larger kernels get
fewer channels), then LayerNorm.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_channels_last,
                                     check_spatial_qkv, default_scale,
                                     dense_attention_reference,
                                     flatten_spatial, masked_softmax,
                                     repeat_kv, to_tuple)

__all__ = ["lsda_attention", "lsda_attention_reference", "LSDAttention",
           "DynamicPosBias", "CrossScaleEmbedding", "LSDA_ATTENTION"]

LSDA_ATTENTION = Op("spatial.lsda_attention")


def _group_extent(spatial, size, mode):
  """(padded length, number of groups, in-group extent) per axis."""
  out = []
  for l, s in zip(spatial, size):
    p = -(-l // s) * s
    out.append((p, p // s, s) if mode == "sda" else (p, s, p // s))
  return out


def _check(query, key, value, size, mode, rpb, key_mask):
  _, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(2,))
  if mode not in ("sda", "lda"):
    raise ValueError(f"`mode` must be 'sda' or 'lda', got {mode!r}.")
  size = to_tuple("size", size, 2)
  ext = _group_extent(query.shape[1:3], size, mode)
  if rpb is not None:
    want = (n,) + tuple(2 * e[2] - 1 for e in ext)
    if tuple(rpb.shape) != want:
      raise ValueError(
          f"`rpb` must have shape [heads, 2*group-1, 2*group-1]={want} for "
          f"mode={mode!r}, size={size}, query {tuple(query.shape)}; got "
          f"{tuple(rpb.shape)}.")
  if key_mask is not None and (tuple(key_mask.shape) != query.shape[:3]
                               or key_mask.dtype != jnp.bool_):
    raise ValueError(f"`key_mask` must be bool [B, H, W]={query.shape[:3]}, "
                     f"got {tuple(key_mask.shape)} {key_mask.dtype}.")
  return n, size, ext


def _to_groups(x, ext, mode):
  """[B, Hp, Wp, ...] -> [B, G, T, ...] (group-major, in-group row-major)."""
  (_, gh, eh), (_, gw, ew) = ext
  b, rest = x.shape[0], x.shape[3:]
  if mode == "sda":        # p = group * G + inner
    x = x.reshape(b, gh, eh, gw, ew, *rest)
    x = jnp.moveaxis(x, 3, 2)                      # b gh gw eh ew
  else:                    # p = inner * I + group
    x = x.reshape(b, eh, gh, ew, gw, *rest)
    x = x.transpose(0, 2, 4, 1, 3, *range(5, x.ndim))
  return x.reshape(b, gh * gw, eh * ew, *rest)


def _from_groups(x, ext, mode):
  (ph, gh, eh), (pw, gw, ew) = ext
  b, rest = x.shape[0], x.shape[3:]
  x = x.reshape(b, gh, gw, eh, ew, *rest)
  if mode == "sda":
    x = jnp.moveaxis(x, 2, 3)                      # b gh eh gw ew
  else:
    x = x.transpose(0, 3, 1, 4, 2, *range(5, x.ndim))
  return x.reshape(b, ph, pw, *rest)


def _xla(config, query, key, value, *, size, mode, ext, rpb, key_mask, scale):
  del config
  b, h, w, n, _ = query.shape
  (ph, _, eh), (pw, _, ew) = ext
  if key_mask is not None:
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  pad = lambda x: jnp.pad(x, [(0, 0), (0, ph - h), (0, pw - w)]
                          + [(0, 0)] * (x.ndim - 3))
  qg, kg, vg = (_to_groups(pad(x), ext, mode) for x in (query, key, value))
  valid = jnp.ones((b, h, w), bool) if key_mask is None else key_mask
  ok = _to_groups(pad(valid), ext, mode)[:, :, None, None, :]  # [B,G,1,1,T]
  logits = jnp.einsum("bgtnd,bgsnd->bgnts", qg, kg,
                      preferred_element_type=jnp.float32) * scale
  if rpb is not None:
    iy, ix = np.meshgrid(np.arange(eh), np.arange(ew), indexing="ij")
    iy, ix = iy.ravel(), ix.ravel()
    off = (iy[:, None] - iy[None] + eh - 1, ix[:, None] - ix[None] + ew - 1)
    logits = logits + rpb.astype(jnp.float32)[:, off[0], off[1]][None, None]
  p = masked_softmax(logits, ok)
  out = jnp.einsum("bgnts,bgsnd->bgtnd", p.astype(vg.dtype), vg,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return _from_groups(out, ext, mode)[:, :h, :w]


LSDA_ATTENTION.register("xla", _xla)


def lsda_attention(query, key, value, size, *, mode: str = "sda", rpb=None,
                   key_mask=None, scale: Optional[float] = None,
                   implementation=None):
  """CrossFormer short- (`mode='sda'`, group G) or long-distance
  (`mode='lda'`, interval I) attention.

  Args:
    query: [B, H, W, N, Hd]; key/value [B, H, W, K, Hd|Hv], N % K == 0.
    size: int or (h, w): G (sda) or I (lda).
    rpb: optional [N, 2g_h - 1, 2g_w - 1] (query - key in-group offsets).
    key_mask: optional bool [B, H, W].
    implementation: dispatch (`LSDA_ATTENTION`: 'xla').
  Returns: [B, H, W, N, Hv] in query.dtype.
  """
  n, size, ext = _check(query, key, value, size, mode, rpb, key_mask)
  return LSDA_ATTENTION(implementation, query, key, value, size=size,
                        mode=mode, ext=ext, rpb=rpb, key_mask=key_mask,
                        scale=default_scale(scale, query.shape[-1]))


def lsda_attention_reference(query, key, value, size, *, mode: str = "sda",
                             rpb=None, key_mask=None,
                             scale: Optional[float] = None):
  """Dense attention with the group mask and in-group offsets computed from
  pixel coordinates (materializes [S, S])."""
  n, size, ext = _check(query, key, value, size, mode, rpb, key_mask)
  h, w = query.shape[1:3]
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  ys, xs = ys.ravel(), xs.ravel()
  if mode == "sda":
    gid = (ys // size[0], xs // size[1])
    inner = (ys % size[0], xs % size[1])
  else:
    gid = (ys % size[0], xs % size[1])
    inner = (ys // size[0], xs // size[1])
  mask = (gid[0][:, None] == gid[0][None]) & (gid[1][:, None] == gid[1][None])
  m = jnp.asarray(mask)[None, None]
  if key_mask is not None:
    m = m & key_mask.reshape(query.shape[0], 1, 1, -1)
  bias = None
  if rpb is not None:
    e = (ext[0][2], ext[1][2])
    oy = np.clip(inner[0][:, None] - inner[0][None] + e[0] - 1, 0, 2 * e[0] - 2)
    ox = np.clip(inner[1][:, None] - inner[1][None] + e[1] - 1, 0, 2 * e[1] - 2)
    bias = rpb[:, oy, ox][None]
  out = dense_attention_reference(flatten_spatial(query), flatten_spatial(key),
                                  flatten_spatial(value), m, bias,
                                  scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class DynamicPosBias(nnx.Module):
  """CrossFormer's DPB: MLP (Linear(2, d) then 3 x [LayerNorm, ReLU,
  Linear], the last to `num_heads`) of the relative offset (dy, dx)."""

  def __init__(self, pos_dim: int, num_heads: int, *, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.pos_proj = nnx.Linear(2, pos_dim, **kw)
    self.pos1_norm = nnx.LayerNorm(pos_dim, epsilon=1e-5, **kw)
    self.pos1 = nnx.Linear(pos_dim, pos_dim, **kw)
    self.pos2_norm = nnx.LayerNorm(pos_dim, epsilon=1e-5, **kw)
    self.pos2 = nnx.Linear(pos_dim, pos_dim, **kw)
    self.pos3_norm = nnx.LayerNorm(pos_dim, epsilon=1e-5, **kw)
    self.pos3 = nnx.Linear(pos_dim, num_heads, **kw)

  def __call__(self, extent):
    """rpb [heads, 2e_h - 1, 2e_w - 1] for offsets (query - key)."""
    eh, ew = extent
    dy, dx = np.meshgrid(np.arange(-(eh - 1), eh), np.arange(-(ew - 1), ew),
                         indexing="ij")
    x = jnp.asarray(np.stack([dy, dx], -1), jnp.float32)
    x = self.pos_proj(x)
    for norm, lin in ((self.pos1_norm, self.pos1), (self.pos2_norm, self.pos2),
                      (self.pos3_norm, self.pos3)):
      x = lin(jax.nn.relu(norm(x)))
    return jnp.moveaxis(x, -1, 0)


class LSDAttention(HeadGated):
  """CrossFormer attention on [B, H, W, C]: `qkv` Linear(C, 3C), DPB
  (`pos_dim = C // 4`), `proj` Linear(C, C); `mode` 'sda' (group_size G) or
  'lda' (interval I). CrossFormer uses G = I = 7 and alternates SDA/LDA
  blocks."""

  def __init__(self, dim: int, num_heads: int, size=7, *, mode: str = "sda",
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if mode not in ("sda", "lda"):
      raise ValueError(f"`mode` must be 'sda' or 'lda', got {mode!r}.")
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.size, self.mode = to_tuple("size", size, 2), mode
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    self.pos = DynamicPosBias(max(dim // 4, 1), num_heads,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    ext = _group_extent(x.shape[1:3], self.size, self.mode)
    rpb = self.pos((ext[0][2], ext[1][2])).astype(x.dtype)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out = lsda_attention(qkv[..., 0, :, :], qkv[..., 1, :, :],
                         qkv[..., 2, :, :], self.size, mode=self.mode, rpb=rpb,
                         key_mask=key_mask, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))


class CrossScaleEmbedding(nnx.Module):
  """CrossFormer's cross-scale embedding layer on [B, H, W, C_in]: one conv
  per kernel size (all with `stride`, padding (k - stride) // 2),
  concatenated along channels, then LayerNorm. Channel split as CrossFormer:
  kernel i of n gets dim // 2^(i+1) channels, the last one the remainder
  (kernels sorted ascending)."""

  def __init__(self, in_dim: int, dim: int, *,
               kernel_sizes: Sequence[int] = (4, 8, 16, 32), stride: int = 4,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    ks = sorted(int(k) for k in kernel_sizes)
    if not ks or any(k < stride or (k - stride) % 2 for k in ks):
      raise ValueError(f"`kernel_sizes` {kernel_sizes} must be >= stride "
                       f"{stride} with (k - stride) even.")
    self.kernel_sizes, self.stride = tuple(ks), stride
    chans = [dim // 2 ** (i + 1) for i in range(len(ks) - 1)]
    chans.append(dim - sum(chans))
    if any(c < 1 for c in chans):
      raise ValueError(f"`dim` {dim} too small for {len(ks)} kernels.")
    self.channels = tuple(chans)
    self.convs = nnx.List([
        nnx.Conv(in_dim, c, (k, k), strides=(stride, stride),
                 padding=[((k - stride) // 2,) * 2] * 2,
                 param_dtype=param_dtype, rngs=rngs)
        for k, c in zip(ks, chans)])
    self.norm = nnx.LayerNorm(dim, epsilon=1e-5, param_dtype=param_dtype,
                              rngs=rngs)

  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"`x` must be [B, H, W, C_in], got {tuple(x.shape)}.")
    return self.norm(jnp.concatenate([c(x) for c in self.convs], -1))
