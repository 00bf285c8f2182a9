"""Fused neighborhood attention (NAT / DiNAT), 1D and 2D, as Pallas kernels.

NATTEN semantics, per spatial axis of length L, kernel size K, dilation d
(K * d <= L): position i is in dilation group i % d with in-group index
i' = i // d (group length n = ceil((L - i % d) / d)); attention stays in the
group; non-causal query i' sees the K in-group keys starting at
clamp(i' - K // 2, 0, n - K) (window shifted inward at the borders, always K
keys); causal query i' sees max(i' - K + 1, 0) .. i'. In 2D the
neighbourhood is the product of the per-axis windows.

How it runs: outside the kernel, each axis is regrouped by dilation group
(groups become extra batch entries) and the image is cut into rectangular
tiles of (tile_h x tile_w) pixels laid out contiguously. The flash kernels
(`flash.py`, same forward/backward and custom_vjp) then run with a
neighbourhood mode: a query tile loops only over the key tiles its windows
reach (a small rectangle of tiles computed from the window-start rule, so
cost grows with pixels x K^2, not pixels^2), and the backward key tile loops
over the query tiles within reach. Inside a tile, the exact NATTEN mask is
applied per element.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._util import (cdiv, check_float, next_pow2,
                                  resolve_interpret, target_platform)
from pallas_kernels.flash import _Cfg, _flash, mha_reference


def _tuple(name, x, nd, minimum=None, kind=int):
  t = tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd
  if kind is int:       # NumPy integers are ints; bools are not
    t = tuple(int(v) if isinstance(v, np.integer) and not isinstance(
        v, (bool, np.bool_)) else (None if isinstance(v, bool) else v)
              for v in t)
  elif kind is bool:
    t = tuple(bool(v) if isinstance(v, np.bool_) else v for v in t)
  if len(t) != nd or any(not isinstance(v, kind) for v in t) or (
      minimum is not None and any(v < minimum for v in t)):
    raise ValueError(
        f"`{name}` must be a {kind.__name__} or a tuple of {nd} of them"
        + (f" >= {minimum}" if minimum is not None else "") + f", got {x!r}.")
  return t


def _tile_size(tile_size, nd):
  """(tile_h, tile_w); 1D takes tile, (tile,) or the documented (1, tile)."""
  if nd == 1 and isinstance(tile_size, (tuple, list)) and len(tile_size) == 2:
    t = _tuple("tile_size", tile_size, 2, 1)
    if t[0] != 1:
      raise ValueError(
          f"`tile_size` for 1 spatial dim must be tile, (tile,) or (1, tile), "
          f"got {tile_size!r}.")
    return t
  t = _tuple("tile_size", tile_size, nd, 1)
  return (1,) + t if nd == 1 else t


def _check(query, key, value, kernel_size, dilation, is_causal):
  if query.ndim not in (4, 5):
    raise ValueError(
        "`query` must be [batch, *spatial, heads, head_dim] with 1 or 2 "
        f"spatial dims, got shape {tuple(query.shape)}.")
  nd = query.ndim - 3
  for nm, x in (("key", key), ("value", value)):
    if x.ndim != query.ndim or x.shape[:1 + nd] != query.shape[:1 + nd]:
      raise ValueError(
          f"`{nm}` {tuple(x.shape)} must share batch and spatial dims with "
          f"`query` {tuple(query.shape)}.")
  for nm, x in (("query", query), ("key", key), ("value", value)):
    check_float(nm, x)
  n, kh = query.shape[-2], key.shape[-2]
  if key.shape[-1] != query.shape[-1] or value.shape[-2] != kh or (
      n % kh != 0):
    raise ValueError(
        f"bad head layout: query {tuple(query.shape)}, key {tuple(key.shape)},"
        f" value {tuple(value.shape)} (need equal head_dim for query/key and "
        "query heads a multiple of kv heads).")
  spatial = tuple(query.shape[1:1 + nd])
  ks = _tuple("kernel_size", kernel_size, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  ca = _tuple("is_causal", is_causal, nd, kind=bool)
  for a, (l, k, d) in enumerate(zip(spatial, ks, dl)):
    if k * d > l:
      raise ValueError(
          f"kernel_size * dilation must be <= the size on every spatial axis; "
          f"axis {a}: kernel_size={k}, dilation={d}, size={l} (spatial shape "
          f"{spatial}).")
  return nd, spatial, ks, dl, ca


def _default_tile(nd, lg, small=False):
  """128-pixel tiles (64 when `small`: 4-byte dtypes on GPU, where the
  128-pixel dK/dV kernel would exceed an A100's shared memory)."""
  if nd == 1:
    return (1, min(64 if small else 128, max(8, next_pow2(lg[1]))))
  return (min(8, next_pow2(lg[0])),
          min(8 if small else 16, max(8, next_pow2(lg[1]))))


def _to_tiles(x, d, lg, tile, nt):
  """[B, L0, L1, N, D] -> [B*d0*d1, nt0*nt1*th*tw, N, D] (groups, tiles)."""
  b, l0, l1, n, hd = x.shape
  x = jnp.pad(x, ((0, 0), (0, d[0] * lg[0] - l0), (0, d[1] * lg[1] - l1),
                  (0, 0), (0, 0)))
  x = x.reshape(b, lg[0], d[0], lg[1], d[1], n, hd)
  x = x.transpose(0, 2, 4, 1, 3, 5, 6).reshape(b * d[0] * d[1], lg[0], lg[1],
                                               n, hd)
  x = jnp.pad(x, ((0, 0), (0, nt[0] * tile[0] - lg[0]),
                  (0, nt[1] * tile[1] - lg[1]), (0, 0), (0, 0)))
  x = x.reshape(-1, nt[0], tile[0], nt[1], tile[1], n, hd)
  return x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(
      -1, nt[0] * nt[1] * tile[0] * tile[1], n, hd)


def _from_tiles(x, b, spatial, d, lg, tile, nt):
  bg, _, n, hd = x.shape
  x = x.reshape(bg, nt[0], nt[1], tile[0], tile[1], n, hd)
  x = x.transpose(0, 1, 3, 2, 4, 5, 6).reshape(
      bg, nt[0] * tile[0], nt[1] * tile[1], n, hd)[:, :lg[0], :lg[1]]
  x = x.reshape(b, d[0], d[1], lg[0], lg[1], n, hd)
  x = x.transpose(0, 3, 1, 4, 2, 5, 6).reshape(b, lg[0] * d[0],
                                               lg[1] * d[1], n, hd)
  return x[:, :spatial[0], :spatial[1]]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _na_run(cfg, spatial, d, lg, tile, nt, q, k, v):
  b = q.shape[0]
  q, k, v = (_to_tiles(x, d, lg, tile, nt) for x in (q, k, v))
  if cfg.heads_major:
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out, _ = _flash(cfg, q, k, v, None, None, None, None, None, None)
  if cfg.heads_major:
    out = jnp.swapaxes(out, 1, 2)
  return _from_tiles(out, b, spatial, d, lg, tile, nt)


def neighborhood_attention(query, key, value, kernel_size, *, dilation=1,
                           is_causal=False, scale: Optional[float] = None,
                           tile_size=None, interpret: Optional[bool] = None,
                           heads_major: Optional[bool] = None):
  """Neighborhood attention over 1 or 2 spatial dims (NATTEN semantics).

  Args:
    query: [B, *spatial, N, H] (spatial = (L,) or (Hs, Ws)); key/value
      [B, *spatial, K, H|Hv] with N % K == 0.
    kernel_size, dilation: int or per-axis tuple; kernel_size * dilation must
      not exceed the axis size.
    is_causal: bool or per-axis tuple.
    scale: default 1/sqrt(H).
    tile_size: (tile_h, tile_w) pixels per kernel tile (1D: (1, tile)).
    interpret: Pallas interpret mode; None -> True on CPU.

  Returns [B, *spatial, N, Hv] in query.dtype. Differentiable.
  """
  nd, spatial, ks, dl, ca = _check(query, key, value, kernel_size, dilation,
                                   is_causal)
  if nd == 1:
    query, key, value = query[:, None], key[:, None], value[:, None]
    spatial, ks, dl, ca = (1,) + spatial, (1,) + ks, (1,) + dl, (False,) + ca
  lg = tuple(cdiv(l, d) for l, d in zip(spatial, dl))
  interpret = resolve_interpret(interpret)
  if tile_size is None:
    small = (target_platform() == "gpu" and not interpret
             and query.dtype.itemsize >= 4)
    tile = _default_tile(nd, lg, small)
  else:
    tile = _tile_size(tile_size, nd)
  nt = tuple(cdiv(l, t) for l, t in zip(lg, tile))
  h = query.shape[-1]
  if heads_major is None:
    heads_major = interpret or target_platform() != "gpu"
  tsz = tile[0] * tile[1]
  cfg = _Cfg(scale=float(1.0 / math.sqrt(h) if scale is None else scale),
             left=math.inf, right=math.inf,
             kv_len=nt[0] * nt[1] * tsz, bq=tsz, bk=tsz, bq_bwd=tsz,
             bk_bwd=tsz, interpret=interpret, platform=target_platform(),
             heads_major=bool(heads_major),
             groups=query.shape[-2] // key.shape[-2],
             na=(nt[1], tile[0], tile[1], ks, dl, spatial, ca))
  out = _na_run(cfg, spatial, dl, lg, tile, nt, query, key, value)
  return out[:, 0] if nd == 1 else out


def neighborhood_mask_np(spatial, kernel_size, dilation=1, is_causal=False):
  """numpy bool [S, S] (row-major flattening) mask from the definition."""
  spatial = tuple(spatial)
  nd = len(spatial)
  ks = _tuple("kernel_size", kernel_size, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  ca = _tuple("is_causal", is_causal, nd, kind=bool)
  m = np.ones((1, 1), bool)
  for l, k, d, c in zip(spatial, ks, dl, ca):
    ax = np.zeros((l, l), bool)
    for i in range(l):
      g, ip = i % d, i // d
      n = len(range(g, l, d))
      st = max(ip - k + 1, 0) if c else min(max(ip - k // 2, 0), n - k)
      en = ip if c else st + k - 1
      for jp in range(st, en + 1):
        ax[i, g + d * jp] = True
    m = (m[:, None, :, None] & ax[None, :, None, :]).reshape(
        m.shape[0] * l, m.shape[1] * l)
  return m


def visited_fraction(spatial, kernel_size, *, dilation=1, is_causal=False,
                     tile_size=None) -> float:
  """Fraction of (query tile, key tile) pairs that hold at least one
  neighbour pair, out of all pairs of the kernel's tiles: the least work a
  tiled kernel can do relative to dense attention over the same tiles.

  Computed from the definition (`neighborhood_mask_np`) and the kernel's
  tiling (dilation groups, then `tile_size` rectangles), not from the
  kernel's loop bounds, so a benchmark can hold the kernel to it.
  """
  spatial = tuple(int(x) for x in spatial)
  nd = len(spatial)
  ks = _tuple("kernel_size", kernel_size, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  mask = neighborhood_mask_np(spatial, ks, dl, is_causal)
  if nd == 1:
    spatial, dl = (1,) + spatial, (1,) + dl
  lg = tuple(cdiv(l, d) for l, d in zip(spatial, dl))
  if tile_size is None:
    tile = _default_tile(nd, lg)
  else:
    tile = _tile_size(tile_size, nd)
  nt = tuple(cdiv(l, t) for l, t in zip(lg, tile))
  r, c = np.divmod(np.arange(spatial[0] * spatial[1]), spatial[1])
  group = (r % dl[0]) * dl[1] + c % dl[1]
  tid = ((group * nt[0] + (r // dl[0]) // tile[0]) * nt[1]
         + (c // dl[1]) // tile[1])
  n_tiles = dl[0] * dl[1] * nt[0] * nt[1]
  qi, kj = np.nonzero(mask)
  pairs = np.unique(tid[qi].astype(np.int64) * n_tiles + tid[kj])
  return float(pairs.size) / float(n_tiles * n_tiles)


def neighborhood_attention_reference(query, key, value, kernel_size, *,
                                     dilation=1, is_causal=False, scale=None):
  """Dense plain-jnp attention with the definition's [S, S] mask."""
  nd, spatial, ks, dl, ca = _check(query, key, value, kernel_size, dilation,
                                   is_causal)
  b = query.shape[0]
  s = int(np.prod(spatial))
  flat = lambda x: x.reshape(b, s, x.shape[-2], x.shape[-1])
  mask = jnp.asarray(neighborhood_mask_np(spatial, ks, dl, ca))
  out = mha_reference(flat(query), flat(key), flat(value), scale=scale,
                      mask=mask)
  return out.reshape(query.shape[:-1] + value.shape[-1:])
