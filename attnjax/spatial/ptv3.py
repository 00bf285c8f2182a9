"""Serialized point-cloud attention (Wu et al. 2024, "Point Transformer V3:
Simpler, Faster, Stronger").

Points [B, N, 3] are quantized to a grid (`grid_size`), ordered along a
space-filling curve, and the ordered sequence is cut into patches of
`patch_size` points; attention runs within each patch. Neighbouring
patches along the curve are spatially close, so this is local attention
without any neighbour search.

* `serialize(coords, order, grid_size, depth)`: curve codes [B, N] (int32).
  'z': Morton code, bits interleaved (x, y, z) from the most significant
  (x highest); 'hilbert': 3D Hilbert index (Skilling's transpose algorithm);
  '-trans' variants swap x and y first (PTv3's second pair of orders).
  Grid coordinates are `floor((c - min_batch) / grid_size)`, clipped to
  `2^depth - 1` per axis (depth <= 10).
* `serialized_attention(q, k, v, coords, patch_size, *, order='z',
  grid_size=1.0, patch_offset=0, key_mask=None)` on q/k/v [B, N, H, D]:
  point i of rank r (position on the curve, stable order) is in patch
  `(r + patch_offset) // patch_size` (PTv3's shifted patches use an offset
  of half a patch). The last patch may be short: its missing slots are
  masked. Outputs are in the input order. A point with nothing to attend to
  returns zeros.

`SerializedAttention` is the layer on point features [B, N, C] with
coordinates [B, N, 3]: `qkv` Linear(C, 3C), `proj` Linear(C, C).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     masked_softmax, repeat_kv)

__all__ = ["serialize", "serialized_attention",
           "serialized_attention_reference", "SerializedAttention",
           "SERIALIZED_ATTENTION", "ORDERS"]

SERIALIZED_ATTENTION = Op("spatial.serialized_attention")
ORDERS = ("z", "z-trans", "hilbert", "hilbert-trans")


def _grid(coords, grid_size, depth):
  c = coords.astype(jnp.float32)
  g = jnp.floor((c - jnp.min(c, axis=1, keepdims=True)) / grid_size)
  return jnp.clip(g, 0, 2 ** depth - 1).astype(jnp.int32)


def _morton(x, y, z, depth):
  code = jnp.zeros_like(x)
  for i in range(depth):
    for a, sh in ((x, 2), (y, 1), (z, 0)):
      code = code | (((a >> i) & 1) << (3 * i + sh))
  return code


def _hilbert(x, y, z, depth):
  """Skilling (2004) AxestoTranspose, then bit interleave."""
  X = [x, y, z]
  n = 3
  q = 1 << (depth - 1)
  while q > 1:                                     # inverse undo
    p = q - 1
    for i in range(n):
      hit = (X[i] & q) != 0
      t = (X[0] ^ X[i]) & p
      x0_hit = X[0] ^ p
      x0_miss = X[0] ^ t
      xi_miss = X[i] ^ t
      if i == 0:
        X[0] = jnp.where(hit, x0_hit, X[0])       # t = 0 when i == 0
      else:
        X[i] = jnp.where(hit, X[i], xi_miss)
        X[0] = jnp.where(hit, x0_hit, x0_miss)
    q >>= 1
  for i in range(1, n):                            # Gray encode
    X[i] = X[i] ^ X[i - 1]
  t = jnp.zeros_like(x)
  q = 1 << (depth - 1)
  while q > 1:
    t = jnp.where((X[n - 1] & q) != 0, t ^ (q - 1), t)
    q >>= 1
  X = [a ^ t for a in X]
  code = jnp.zeros_like(x)
  for j in range(depth):
    for i in range(n):
      code = code | (((X[i] >> j) & 1) << (j * n + (n - 1 - i)))
  return code


def serialize(coords, order: str = "z", grid_size: float = 1.0,
              depth: int = 10):
  """Space-filling-curve codes [B, N] (int32) of points [B, N, 3]."""
  if coords.ndim != 3 or coords.shape[-1] != 3:
    raise ValueError(f"`coords` must be [batch, points, 3], got "
                     f"{tuple(coords.shape)}.")
  if order not in ORDERS:
    raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
  if not (isinstance(depth, int) and 1 <= depth <= 10):
    raise ValueError(f"`depth` must be an int in [1, 10], got {depth!r}.")
  if not grid_size > 0:
    raise ValueError(f"`grid_size` must be > 0, got {grid_size!r}.")
  g = _grid(coords, grid_size, depth)
  x, y, z = g[..., 0], g[..., 1], g[..., 2]
  if order.endswith("-trans"):
    x, y = y, x
  return (_morton if order.startswith("z") else _hilbert)(x, y, z, depth)


def _ranks(codes):
  """Stable sort: perm [B, N] (sorted -> original), ranks (original ->
  sorted)."""
  perm = jnp.argsort(codes, axis=-1, stable=True)
  ranks = jnp.argsort(perm, axis=-1)
  return perm, ranks


def _check(query, key, value, coords, patch_size, patch_offset, key_mask):
  check_spatial_qkv(query, key, value, spatial_dims=(1,))
  b, n = query.shape[:2]
  if coords.shape != (b, n, 3):
    raise ValueError(f"`coords` must be [batch, points, 3]={(b, n, 3)}, got "
                     f"{tuple(coords.shape)}.")
  if not (isinstance(patch_size, (int, np.integer)) and patch_size >= 1):
    raise ValueError(f"`patch_size` must be an int >= 1, got {patch_size!r}.")
  if not (isinstance(patch_offset, (int, np.integer))
          and 0 <= patch_offset < patch_size):
    raise ValueError(f"`patch_offset` must be in [0, patch_size), got "
                     f"{patch_offset!r}.")
  if key_mask is not None and (tuple(key_mask.shape) != (b, n)
                               or key_mask.dtype != jnp.bool_):
    raise ValueError(f"`key_mask` must be bool [batch, points]={(b, n)}, got "
                     f"{tuple(key_mask.shape)} {key_mask.dtype}.")


def _xla(config, query, key, value, codes, *, patch_size, patch_offset,
         key_mask, scale):
  del config
  b, n, h, _ = query.shape
  p, off = patch_size, patch_offset
  perm, ranks = _ranks(codes)
  if key_mask is not None:
    km = key_mask[..., None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  key, value = repeat_kv(key, h), repeat_kv(value, h)
  total = -(-(n + off) // p) * p
  g = total // p

  def to_patches(x):
    xs = jnp.take_along_axis(x, perm.reshape(b, n, *([1] * (x.ndim - 2))),
                             axis=1)
    xs = jnp.pad(xs, [(0, 0), (off, total - n - off)] + [(0, 0)] * (x.ndim - 2))
    return xs.reshape(b, g, p, *x.shape[2:])

  qp, kp, vp = (to_patches(x) for x in (query, key, value))
  valid = jnp.ones((b, n), bool) if key_mask is None else key_mask
  okp = to_patches(valid)[:, :, None, None, :]               # [B, G, 1, 1, P]
  logits = jnp.einsum("bgtnd,bgsnd->bgnts", qp, kp,
                      preferred_element_type=jnp.float32) * scale
  pr = masked_softmax(logits, okp)
  out = jnp.einsum("bgnts,bgsne->bgtne", pr.astype(vp.dtype), vp,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  out = out.reshape(b, total, h, -1)[:, off:off + n]         # sorted order
  return jnp.take_along_axis(out, ranks[..., None, None], axis=1)


SERIALIZED_ATTENTION.register("xla", _xla)


def serialized_attention(query, key, value, coords, patch_size: int, *,
                         order: str = "z", grid_size: float = 1.0,
                         depth: int = 10, patch_offset: int = 0,
                         key_mask=None, scale: Optional[float] = None,
                         implementation=None):
  """PTv3 patch attention along a space-filling curve.

  Args:
    query: [B, N, H, D]; key/value [B, N, K, D|Dv], H % K == 0.
    coords: [B, N, 3] point coordinates.
    patch_size: points per patch.
    order, grid_size, depth: see `serialize`.
    patch_offset: shift of the patch boundaries along the curve.
    key_mask: optional bool [B, N].
    implementation: dispatch (`SERIALIZED_ATTENTION`: 'xla').
  Returns: [B, N, H, Dv] in query.dtype, input point order.
  """
  _check(query, key, value, coords, patch_size, patch_offset, key_mask)
  codes = jax.lax.stop_gradient(serialize(coords, order, grid_size, depth))
  return SERIALIZED_ATTENTION(
      implementation, query, key, value, codes, patch_size=int(patch_size),
      patch_offset=int(patch_offset), key_mask=key_mask,
      scale=default_scale(scale, query.shape[-1]))


def serialized_attention_reference(query, key, value, coords, patch_size, *,
                                   order="z", grid_size=1.0, depth=10,
                                   patch_offset=0, key_mask=None, scale=None):
  """Dense [N, N] attention with the same-patch mask from the curve ranks,
  rank(i) = #{j: code_j < code_i or (code_j == code_i and j < i)}."""
  _check(query, key, value, coords, patch_size, patch_offset, key_mask)
  codes = jax.lax.stop_gradient(serialize(coords, order, grid_size, depth))
  n = codes.shape[1]
  before = (codes[:, None, :] < codes[:, :, None]) | (
      (codes[:, None, :] == codes[:, :, None])
      & (np.arange(n)[None, :] < np.arange(n)[:, None])[None])
  ranks = before.sum(-1)
  patch = (ranks + patch_offset) // patch_size                # [B, N]
  m = (patch[:, :, None] == patch[:, None, :])[:, None]
  if key_mask is not None:
    m = m & key_mask[:, None, None, :]
  return dense_attention_reference(query, key, value, m, None,
                                   scale=default_scale(scale, query.shape[-1]))


class SerializedAttention(HeadGated):
  """PTv3's serialized attention layer on point features [B, N, C] with
  coordinates [B, N, 3]: `qkv` Linear(C, 3C), `proj` Linear(C, C); `order`
  per layer (PTv3 cycles through `ORDERS`), `patch_offset` for shifted
  patches."""

  def __init__(self, dim: int, num_heads: int, patch_size: int = 1024, *,
               order: str = "z", grid_size: float = 0.02, depth: int = 10,
               patch_offset: int = 0, qkv_bias: bool = True,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if order not in ORDERS:
      raise ValueError(f"`order` must be one of {ORDERS}, got {order!r}.")
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.patch_size, self.order, self.grid_size = patch_size, order, grid_size
    self.depth, self.patch_offset = depth, patch_offset
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x, coords, key_mask=None):
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"`x` must be point features [B, N, dim={self.dim}], "
                       f"got {tuple(x.shape)}.")
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    p = min(self.patch_size, x.shape[1])
    out = serialized_attention(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], coords, p,
        order=self.order, grid_size=self.grid_size, depth=self.depth,
        patch_offset=min(self.patch_offset, p - 1), key_mask=key_mask,
        scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(x.shape))
