"""Neighborhood attention (NAT / DiNAT), 1-3 spatial dims, NATTEN semantics.

Definition, per spatial axis of length L with kernel size K, dilation d
(NATTEN requires K * d <= L):

* Dilation groups. Position i belongs to group g = i % d; the group is the
  sub-sequence g, g + d, g + 2d, ... of length n_g = ceil((L - g) / d), and
  i has in-group index i' = i // d. Attention never leaves the group.
* Non-causal window. Query i' sees the K consecutive in-group keys starting
  at clamp(i' - K // 2, 0, n_g - K): centred where possible and shifted inward
  at the borders, so every query sees exactly K keys per axis (K**ndim total).
  For even K the window has K // 2 keys before the query and K // 2 - 1 after.
* Causal window (per axis). Query i' sees in-group keys
  max(i' - K + 1, 0) .. i': no shift, so early queries see fewer keys.
* Multi-dim. The neighbourhood is the Cartesian product of the per-axis
  windows.
* Relative position bias `rpb` [heads, 2K_1 - 1, ..., 2K_n - 1]: the logit of
  query i and key j gets rpb[h, (j'_1 - i'_1) + K_1 - 1, ...] (in-group offsets;
  NATTEN's table layout, so NAT/DiNAT weights load directly).

Implementation ('xla'): queries are cut, within each dilation group, into
tiles of `tile_size` positions per axis; the union of their windows is a
contiguous run of at most tile + K - 1 keys per axis, gathered once per tile.
Attention is computed per tile over that run with a static mask, so memory
and FLOPs grow linearly in the number of pixels (never the S x S matrix).
`neighborhood_attention_reference` builds the dense [S, S] mask from the
definition and runs plain masked attention; it is the test oracle.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._checks import check_implementation, pallas_refuses
from attnjax.spatial._common import (check_channels_last, layer_scale,
    check_spatial_qkv, default_scale,
                                     dense_attention_reference,
                                     flatten_spatial, masked_softmax,
                                     repeat_kv, to_bool_tuple, to_tuple)

__all__ = [
    "neighborhood_attention", "neighborhood_attention_reference",
    "neighborhood_mask", "neighborhood_window_start", "NeighborhoodAttention",
]


def neighborhood_window_start(length: int, kernel_size: int, dilation: int = 1,
                              is_causal: bool = False):
  """numpy int [length]: first key (absolute index) each query attends to.

  Keys are start, start + d, ..., K of them (non-causal) or up to the query
  itself (causal).
  """
  (length,) = to_tuple("length", length, 1)
  (kernel_size,) = to_tuple("kernel_size", kernel_size, 1)
  (dilation,) = to_tuple("dilation", dilation, 1)
  if kernel_size * dilation > length:
    raise ValueError(
        f"kernel_size * dilation must be <= `length`: kernel_size="
        f"{kernel_size}, dilation={dilation}, length={length}.")
  i = np.arange(length)
  g, ip = i % dilation, i // dilation
  n_g = (length - g + dilation - 1) // dilation
  if is_causal:
    sp = np.maximum(ip - kernel_size + 1, 0)
  else:
    sp = np.clip(ip - kernel_size // 2, 0, n_g - kernel_size)
  return g + dilation * sp


def _axis_mask(length, kernel_size, dilation, is_causal):
  """numpy bool [L, L] and int rel-offset index [L, L] for one axis."""
  start = neighborhood_window_start(length, kernel_size, dilation, is_causal)
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  same_group = (j % dilation) == (i % dilation)
  jp, ip, sp = j // dilation, i // dilation, start[:, None] // dilation
  if is_causal:
    inside = (jp >= sp) & (jp <= ip)
  else:
    inside = (jp >= sp) & (jp < sp + kernel_size)
  rel = np.clip(jp - ip + kernel_size - 1, 0, 2 * kernel_size - 2)
  return same_group & inside, rel


def _normalize_args(spatial_shape, kernel_size, dilation, is_causal):
  nd = len(spatial_shape)
  ks = to_tuple("kernel_size", kernel_size, nd, minimum=1)
  dl = to_tuple("dilation", dilation, nd, minimum=1)
  ca = to_bool_tuple("is_causal", is_causal, nd)
  for a, (l, k, d) in enumerate(zip(spatial_shape, ks, dl)):
    if k * d > l:
      raise ValueError(
          f"kernel_size * dilation must be <= the input size on every spatial "
          f"axis; axis {a}: kernel_size={k}, dilation={d}, size={l} (spatial "
          f"shape {tuple(spatial_shape)}).")
  return ks, dl, ca


def neighborhood_mask(spatial_shape: Sequence[int], kernel_size, dilation=1,
                      is_causal=False) -> np.ndarray:
  """Dense numpy bool [S, S] (S = prod(spatial_shape), row-major) mask.

  True where query (row) attends key (column) under NATTEN semantics.
  """
  spatial_shape = tuple(int(s) for s in spatial_shape)
  ks, dl, ca = _normalize_args(spatial_shape, kernel_size, dilation, is_causal)
  m = np.ones((1, 1), bool)
  for l, k, d, c in zip(spatial_shape, ks, dl, ca):
    ma, _ = _axis_mask(l, k, d, c)
    m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(
        m.shape[0] * l, m.shape[1] * l)
  return m


def _check_rpb(rpb, num_heads, ks):
  want = (num_heads,) + tuple(2 * k - 1 for k in ks)
  if tuple(rpb.shape) != want:
    raise ValueError(
        f"`rpb` must have shape [heads, 2*kernel_size-1 per axis]={want}, got "
        f"{tuple(rpb.shape)}.")


def neighborhood_attention_reference(query, key, value, kernel_size, *,
                                     dilation=1, is_causal=False, scale=None,
                                     rpb=None):
  """Dense masked attention with the definition's [S, S] mask (test oracle)."""
  nd, n, _ = check_spatial_qkv(query, key, value)
  spatial = tuple(query.shape[1:1 + nd])
  ks, dl, ca = _normalize_args(spatial, kernel_size, dilation, is_causal)
  mask = jnp.asarray(neighborhood_mask(spatial, ks, dl, ca))
  bias = None
  if rpb is not None:
    _check_rpb(rpb, n, ks)
    rels = [_axis_mask(l, k, d, c)[1] for l, k, d, c in zip(spatial, ks, dl, ca)]
    # bias[h, q_1..q_n, k_1..k_n] = rpb[h, rel_1[q_1, k_1], ..., rel_n[q_n, k_n]]
    idx = []
    for a, r in enumerate(rels):
      shape = [1] * (2 * nd)
      shape[a], shape[nd + a] = r.shape
      idx.append(np.broadcast_to(r.reshape(shape), spatial + spatial))
    s = int(np.prod(spatial))
    bias = rpb.astype(jnp.float32)[(slice(None),) + tuple(idx)]
    bias = bias.reshape(n, s, s)[None]
  out = dense_attention_reference(
      flatten_spatial(query), flatten_spatial(key), flatten_spatial(value),
      mask[None, None], bias, scale=default_scale(scale, query.shape[-1]))
  return out.reshape(query.shape[:-1] + value.shape[-1:])


@functools.lru_cache(maxsize=256)
def _axis_plan(length, kernel_size, dilation, is_causal, tile):
  """Static tiling of one axis.

  Returns (lg, ntiles, tile, kt, kidx [d, nT, kt], mask [d, nT, tile, kt],
  rel [d, nT, tile, kt]); positions are in-group indices.
  """
  d, k = dilation, kernel_size
  lg = -(-length // d)
  tile = max(1, min(tile, lg))
  nt = -(-lg // tile)
  kt = min(tile + k - 1, lg)
  kidx = np.zeros((d, nt, kt), np.int32)
  mask = np.zeros((d, nt, tile, kt), bool)
  rel = np.zeros((d, nt, tile, kt), np.int32)
  for g in range(d):
    n_g = -(-(length - g) // d)
    for t in range(nt):
      q = np.arange(t * tile, t * tile + tile)
      valid = q < n_g
      qc = np.minimum(q, n_g - 1)
      if is_causal:
        st = np.maximum(qc - k + 1, 0)
        en = qc + 1
      else:
        st = np.clip(qc - k // 2, 0, n_g - k)
        en = st + k
      ks = min(int(st[0]), lg - kt)
      cols = ks + np.arange(kt)
      kidx[g, t] = cols
      mask[g, t] = (valid[:, None] & (cols[None, :] >= st[:, None]) &
                    (cols[None, :] < en[:, None]))
      rel[g, t] = np.clip(cols[None, :] - qc[:, None] + k - 1, 0, 2 * k - 2)
  return lg, nt, tile, kt, kidx, mask, rel


def _axis_layout(arr, a, nd, lead):
  """Places per-axis array dims [d, nT, (T), (kt)] into the joint layout.

  Joint layout: [d_1..d_n, nT_1..nT_n, T_1..T_n, kt_1..kt_n] (`lead` = 2 for
  kidx-free arrays of rank 4; the trailing groups only where present).
  """
  groups = arr.ndim
  shape = [1] * (groups * nd)
  for gi in range(groups):
    shape[gi * nd + a] = arr.shape[gi]
  del lead
  return arr.reshape(shape)


def neighborhood_attention(query, key, value, kernel_size, *, dilation=1,
                           is_causal=False, scale: Optional[float] = None,
                           rpb=None, tile_size=None,
                           implementation: Optional[str] = None):
  """Neighborhood attention with NATTEN semantics (see module docstring).

  Args:
    query: [B, *spatial, N, H] with 1, 2 or 3 spatial dims.
    key, value: [B, *spatial, K, H] / [B, *spatial, K, Hv]; N % K == 0 (GQA).
    kernel_size: int or per-axis tuple; kernel_size * dilation <= size.
    dilation: int or per-axis tuple.
    is_causal: bool or per-axis tuple.
    scale: logit scale, default 1/sqrt(H).
    rpb: optional relative position bias [N, 2K_1 - 1, ...] (NATTEN layout).
    tile_size: query tile per axis for the blocked computation (int or tuple;
      default max(kernel_size, 4); with 'pallas', the kernel's tile in
      pixels per axis, default 8 x 16). Results do not depend on it.
    implementation: None / 'xla' (the tiled XLA computation below) or
      'pallas' (the fused kernel `pallas_kernels.neighborhood_attention`,
      which visits only the key tiles a query tile can reach; 1D and 2D,
      no `rpb`; interpret mode on CPU).

  Returns:
    [B, *spatial, N, Hv] in query.dtype.
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  spatial = tuple(query.shape[1:1 + nd])
  ks, dl, ca = _normalize_args(spatial, kernel_size, dilation, is_causal)
  if check_implementation(implementation,
                          "neighborhood_attention") == "pallas":
    if rpb is not None:
      raise pallas_refuses("neighborhood_attention",
                           "takes no relative position bias `rpb`")
    if nd > 2:
      raise pallas_refuses("neighborhood_attention",
                           f"covers 1D and 2D, got {nd} spatial dims")
    from pallas_kernels import neighborhood as pallas_na
    tiles = None if tile_size is None else to_tuple("tile_size", tile_size, nd)
    return pallas_na.neighborhood_attention(
        query, key, value, ks, dilation=dl, is_causal=ca, scale=scale,
        tile_size=tiles if nd == 2 or tiles is None else tiles[0])
  if tile_size is None:
    tiles = tuple(max(k, 4) for k in ks)
  else:
    tiles = to_tuple("tile_size", tile_size, nd)
  if rpb is not None:
    _check_rpb(rpb, n, ks)
  scale = default_scale(scale, query.shape[-1])
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  b, h, hv = query.shape[0], query.shape[-1], value.shape[-1]
  plans = [_axis_plan(l, k, d, c, t)
           for l, k, d, c, t in zip(spatial, ks, dl, ca, tiles)]

  # Queries: pad each axis to nT * T * d, split into [nT, T, d].
  pads = [(0, 0)] + [(0, p[1] * p[2] * d - l)
                     for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
  q = jnp.pad(query, pads)
  shape = [b]
  for p, d in zip(plans, dl):
    shape += [p[1], p[2], d]
  q = q.reshape(*shape, n, h)
  # -> [B, d..., nT..., N, T..., H]
  perm = ([0] + [3 + 3 * a for a in range(nd)] + [1 + 3 * a for a in range(nd)]
          + [1 + 3 * nd] + [2 + 3 * a for a in range(nd)] + [2 + 3 * nd])
  q = q.transpose(perm)

  # Keys/values: pad each axis to lg * d, split [lg, d], gather the tile runs.
  def gather(x):
    pads = [(0, 0)] + [(0, p[0] * d - l)
                       for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
    x = jnp.pad(x, pads)
    shape = [b]
    for p, d in zip(plans, dl):
      shape += [p[0], d]
    x = x.reshape(*shape, n, x.shape[-1])
    # x: [B, (lg, d)*nd, N, C]; gather axis by axis (processed axes become
    # (d, nT, kt) triples).
    for a, (p, d) in enumerate(zip(plans, dl)):
      kidx = p[4]
      grp = np.arange(d, dtype=np.int32)[:, None, None]
      x = x[(slice(None),) * (1 + 3 * a) + (kidx, grp)]
    # x: [B, (d, nT, kt)*nd, N, C] -> [B, d..., nT..., N, kt..., C]
    perm = ([0] + [1 + 3 * a for a in range(nd)] + [2 + 3 * a for a in range(nd)]
            + [1 + 3 * nd] + [3 + 3 * a for a in range(nd)] + [2 + 3 * nd])
    return x.transpose(perm)

  k = gather(key)
  v = gather(value)
  lead = k.shape[:1 + 2 * nd]
  tq = int(np.prod([p[2] for p in plans]))
  tk = int(np.prod([p[3] for p in plans]))
  qf = q.reshape(b, -1, n, tq, h)
  kf = k.reshape(b, -1, n, tk, h)
  vf = v.reshape(b, -1, n, tk, hv)
  logits = jnp.einsum("bgnqh,bgnkh->bgnqk", qf, kf,
                      preferred_element_type=jnp.float32) * scale

  # Static mask in the joint layout [d.., nT.., T.., kt..] -> [G, 1, tq, tk].
  mask = None
  for a, p in enumerate(plans):
    ma = _axis_layout(p[5], a, nd, 0)
    mask = ma if mask is None else (mask & ma)
  full = tuple(dl) + tuple(p[1] for p in plans) + tuple(
      p[2] for p in plans) + tuple(p[3] for p in plans)
  mask = np.broadcast_to(mask, full).reshape(-1, 1, tq, tk)

  if rpb is not None:
    idx = tuple(np.broadcast_to(_axis_layout(p[6], a, nd, 0), full)
                for a, p in enumerate(plans))
    bias = rpb.astype(jnp.float32)[(slice(None),) + idx]  # [N, *full]
    bias = bias.reshape(n, -1, tq, tk).transpose(1, 0, 2, 3)
    logits = logits + bias[None]
  probs = masked_softmax(logits, jnp.asarray(mask)[None])
  out = jnp.einsum("bgnqk,bgnkh->bgnqh", probs.astype(value.dtype), vf,
                   preferred_element_type=jnp.float32).astype(query.dtype)

  # [B, d.., nT.., N, T.., Hv] -> [B, (nT, T, d)..., N, Hv] -> crop.
  out = out.reshape(*lead, n, *[p[2] for p in plans], hv)
  perm = [0]
  for a in range(nd):
    perm += [1 + nd + a, 2 + 2 * nd + a, 1 + a]
  perm += [1 + 2 * nd, 2 + 3 * nd]
  out = out.transpose(perm)
  out = out.reshape(b, *[p[1] * p[2] * d for p, d in zip(plans, dl)], n, hv)
  return out[(slice(None),) + tuple(slice(0, l) for l in spatial)]


class NeighborhoodAttention(nnx.Module):
  """NAT / DiNAT neighborhood attention layer on channels-last feature maps.

  Parameters as NATTEN's NeighborhoodAttention{1,2,3}D: `qkv` Linear(dim,
  3 dim, bias=qkv_bias), `rpb` [num_heads, 2K-1 per axis] when `use_rpb`
  (zero-initialized here; NAT uses trunc_normal(0.02)), `proj`
  Linear(dim, dim). Input [B, *spatial, dim] with `len(kernel_size)` spatial
  dims (an int kernel_size means 2D). `implementation='pallas'` runs the
  fused kernel (1D/2D, needs use_rpb=False).

  Inputs smaller than kernel_size * dilation on an axis: NAT zero-pads the
  map (and attends to the padding); here the dilation is reduced to
  max(1, size // kernel) and, if still too small, the kernel to the size (the
  central part of the rpb table is used), which equals attention over all
  valid positions of that axis.
  """

  def __init__(self, dim: int, num_heads: int, kernel_size=7, *, dilation=1,
               is_causal=False, qkv_bias: bool = True, use_rpb: bool = True,
               qk_scale: Optional[float] = None, spatial_dims: Optional[int] = None,
               implementation: Optional[str] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(
          f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
    if spatial_dims is None:
      spatial_dims = 2 if isinstance(kernel_size, int) else len(kernel_size)
    self.spatial_dims = spatial_dims
    self.implementation = implementation
    self.kernel_size = to_tuple("kernel_size", kernel_size, spatial_dims)
    self.dilation = to_tuple("dilation", dilation, spatial_dims)
    self.is_causal = to_bool_tuple("is_causal", is_causal, spatial_dims)
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.scale = layer_scale(qk_scale, self.head_dim ** -0.5)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    if use_rpb:
      self.rpb = nnx.Param(jnp.zeros(
          (num_heads,) + tuple(2 * k - 1 for k in self.kernel_size),
          param_dtype))
    else:
      self.rpb = None

  def __call__(self, x):
    nd = self.spatial_dims
    check_channels_last(x, self.qkv.in_features, nd)
    spatial = x.shape[1:1 + nd]
    ks, dl = [], []
    for l, k, d in zip(spatial, self.kernel_size, self.dilation):
      if k * d > l:
        d = max(1, l // k)
        k = min(k, l)
      ks.append(k)
      dl.append(d)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    rpb = None
    if self.rpb is not None:
      rpb = self.rpb[...]
      sl = tuple(slice(kf - ke, kf + ke - 1)
                 for kf, ke in zip(self.kernel_size, ks))
      rpb = rpb[(slice(None),) + sl]
    out = neighborhood_attention(q, k, v, tuple(ks), dilation=tuple(dl),
                                 is_causal=self.is_causal, scale=self.scale,
                                 rpb=rpb, implementation=self.implementation)
    return self.proj(out.reshape(x.shape))
