"""Fused neighborhood attention (NAT / DiNAT / GNA), 1-3D, as Pallas kernels.

NATTEN semantics, per spatial axis of length L, kernel size K, stride s and
dilation d (K * d <= L, s <= K): position i is in dilation group i % d with
in-group index i' = i // d; attention stays in the group, and query i' sees
the in-group keys `pallas_kernels._rules.na_window` gives (the one written
rule: centred window shifted inward at the borders, the window of its stride
group's leader, causal windows ending at the query). The neighbourhood is the
product of the per-axis windows.

How it runs: outside the kernel, each axis is regrouped by dilation group
(groups become extra batch entries) and the map is cut into boxes of
tile_0 x ... x tile_{n-1} pixels laid out contiguously. The flash kernels
(`flash.py`, same forward/backward and custom_vjp) then run in neighbourhood
mode, driven by a `NeighborhoodTiling` (the `na` field of their config): a
query tile loops only over the key tiles its windows reach (a box of tiles
computed from the window rule, so cost grows with pixels x K^ndim, not
pixels^2), and in the backward pass a key tile loops over the query tiles
within reach (`_rules.na_query_reach`). Inside a tile the exact mask is
applied per element. The kernels also return the log-sum-exp, whose
cotangent the backward pass takes, so `return_lse=True` is differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels._rules import (cdiv, default_scale, na_group_length,
                                   na_query_reach, na_window)
from pallas_kernels._util import (check_float, next_pow2, resolve_interpret,
                                  target_platform)
from pallas_kernels.flash import FlashConfig, flash_core, mha_reference

__all__ = ["NeighborhoodTiling", "neighborhood_attention",
           "neighborhood_attention_reference", "neighborhood_mask_np",
           "visited_fraction"]


def _prod(xs) -> int:
  return int(np.prod(xs, dtype=np.int64)) if len(xs) else 1


@dataclasses.dataclass(frozen=True)
class NeighborhoodTiling:
  """The neighbourhood mode of the flash kernels (their `FlashConfig.na`).

  Arrays seen by the kernels are [B * prod(dilation), prod(num_tiles) *
  prod(tile), ...]: dilation groups in the batch dim (row-major over axes),
  then tiles in row-major order, each tile's pixels row-major. The methods
  are called inside the kernels (traced values):

  * `group_lengths(batch_program)`: per-axis in-group lengths of the
    program's dilation group;
  * `valid(shape, q_start, k_start, lengths)`: bool [bq, bk] mask of a
    (query tile, key tile) pair;
  * `bounds(tile, inverse, lengths)`: (0, count, index_of_step) over the key
    tiles query tile `tile` reaches (inverse: the query tiles reaching key
    tile `tile`).
  """
  num_tiles: Tuple[int, ...]
  tile: Tuple[int, ...]
  kernel_size: Tuple[int, ...]
  stride: Tuple[int, ...]
  dilation: Tuple[int, ...]
  spatial: Tuple[int, ...]
  is_causal: Tuple[bool, ...]

  @property
  def tile_pixels(self) -> int:
    return _prod(self.tile)

  def _coord(self, flat, sizes, a):
    """Axis-a coordinate of a row-major flat index over `sizes`."""
    return (flat // _prod(sizes[a + 1:])) % sizes[a]

  def group_lengths(self, batch_program):
    return tuple(
        na_group_length(l, self._coord(batch_program, self.dilation, a), d)
        for a, (l, d) in enumerate(zip(self.spatial, self.dilation)))

  def valid(self, shape, q_start, k_start, lengths):
    tsz = self.tile_pixels
    qt, kt = q_start // tsz, k_start // tsz
    qe = lax.broadcasted_iota(jnp.int32, shape, 0)
    ke = lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = None
    for a, (t, k, s, c) in enumerate(zip(self.tile, self.kernel_size,
                                         self.stride, self.is_causal)):
      n = lengths[a]
      qp = self._coord(qt, self.num_tiles, a) * t + self._coord(qe, self.tile,
                                                                a)
      kp = self._coord(kt, self.num_tiles, a) * t + self._coord(ke, self.tile,
                                                                a)
      first, last = na_window(qp, n, k, s, c, xp=jnp)
      part = (kp < n) & (kp >= first) & (kp <= last)
      ok = part if ok is None else ok & part
    return ok

  def bounds(self, tile, inverse, lengths):
    starts, counts = [], []
    for a, (size, k, s, c) in enumerate(zip(self.tile, self.kernel_size,
                                            self.stride, self.is_causal)):
      n = lengths[a]
      first = self._coord(tile, self.num_tiles, a) * size
      last = jnp.minimum(first + size - 1, n - 1)
      if not inverse:
        lo = na_window(first, n, k, s, c, xp=jnp)[0]
        hi = na_window(last, n, k, s, c, xp=jnp)[1]
      else:
        before, after = na_query_reach(k, c)
        lo = jnp.maximum(first - before, 0)
        hi = jnp.minimum(last + after, n - 1)
      cnt = lax.select(first < n,
                       jnp.asarray(hi // size - lo // size + 1, jnp.int32),
                       jnp.asarray(0, jnp.int32))
      starts.append(lo // size)
      counts.append(cnt)
    total = counts[0]
    for cnt in counts[1:]:
      total = total * cnt
    safe = [jnp.maximum(cnt, 1) for cnt in counts]

    def index(t):
      flat = 0
      for a in range(len(counts)):
        inner = 1
        for cnt in safe[a + 1:]:
          inner = inner * cnt
        coord = starts[a] + (t // inner) % safe[a]
        flat = flat * self.num_tiles[a] + coord
      return flat

    return 0, total, index


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------

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
  """Pixels per axis of a tile; 1D also takes the documented (1, tile)."""
  if nd == 1 and isinstance(tile_size, (tuple, list)) and len(tile_size) == 2:
    t = _tuple("tile_size", tile_size, 2, 1)
    if t[0] != 1:
      raise ValueError(
          f"`tile_size` for 1 spatial dim must be tile, (tile,) or (1, tile), "
          f"got {tile_size!r}.")
    return t[1:]
  return _tuple("tile_size", tile_size, nd, 1)


def _check(query, key, value, kernel_size, stride, dilation, is_causal):
  if query.ndim not in (4, 5, 6):
    raise ValueError(
        "`query` must be [batch, *spatial, heads, head_dim] with 1, 2 or 3 "
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
  st = _tuple("stride", stride, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  ca = _tuple("is_causal", is_causal, nd, kind=bool)
  for a, (l, k, s, d) in enumerate(zip(spatial, ks, st, dl)):
    if k * d > l:
      raise ValueError(
          f"kernel_size * dilation must be <= the size on every spatial axis; "
          f"axis {a}: kernel_size={k}, dilation={d}, size={l} (spatial shape "
          f"{spatial}).")
    if s > k:
      raise ValueError(
          f"`stride` must be <= `kernel_size` on every axis; axis {a}: "
          f"stride={s}, kernel_size={k}.")
  return nd, spatial, ks, st, dl, ca


def _default_tile(lg, small=False):
  """About 128 pixels per tile (64 when `small`: 4-byte dtypes on GPU, where
  the 128-pixel dK/dV kernel would exceed an A100's shared memory); the last
  axis gets at least 8."""
  nd = len(lg)
  widest = {1: 64 if small else 128, 2: 8 if small else 16, 3: 8}[nd]
  last = min(widest, max(8, next_pow2(lg[-1])))
  if nd == 1:
    return (last,)
  if nd == 2:
    return (min(8, next_pow2(lg[0])), last)
  return (min(2, next_pow2(lg[0])), min(4 if small else 8, next_pow2(lg[1])),
          last)


# ----------------------------------------------------------------------------
# Layout: [B, *L, N, D] <-> [B * prod(d), prod(nt) * prod(tile), N, D]
# ----------------------------------------------------------------------------

def _to_tiles(x, d, lg, tile, nt):
  nd = len(d)
  b, n, hd = x.shape[0], x.shape[-2], x.shape[-1]
  spatial = x.shape[1:1 + nd]
  x = jnp.pad(x, [(0, 0)] + [(0, dd * g - l) for dd, g, l in
                             zip(d, lg, spatial)] + [(0, 0)] * 2)
  x = x.reshape(b, *[v for g, dd in zip(lg, d) for v in (g, dd)], n, hd)
  perm = ([0] + [2 + 2 * a for a in range(nd)] + [1 + 2 * a for a in range(nd)]
          + [1 + 2 * nd, 2 + 2 * nd])
  x = x.transpose(perm).reshape(b * _prod(d), *lg, n, hd)
  x = jnp.pad(x, [(0, 0)] + [(0, c * t - g) for c, t, g in zip(nt, tile, lg)]
              + [(0, 0)] * 2)
  x = x.reshape(-1, *[v for c, t in zip(nt, tile) for v in (c, t)], n, hd)
  perm = ([0] + [1 + 2 * a for a in range(nd)] + [2 + 2 * a for a in range(nd)]
          + [1 + 2 * nd, 2 + 2 * nd])
  return x.transpose(perm).reshape(-1, _prod(nt) * _prod(tile), n, hd)


def _from_tiles(x, b, spatial, d, lg, tile, nt):
  nd = len(d)
  bg, _, n, hd = x.shape
  x = x.reshape(bg, *nt, *tile, n, hd)
  perm = [0] + [v for a in range(nd) for v in (1 + a, 1 + nd + a)] + [
      1 + 2 * nd, 2 + 2 * nd]
  x = x.transpose(perm).reshape(bg, *[c * t for c, t in zip(nt, tile)], n, hd)
  x = x[(slice(None),) + tuple(slice(0, g) for g in lg)]
  x = x.reshape(b, *d, *lg, n, hd)
  perm = [0] + [v for a in range(nd) for v in (1 + nd + a, 1 + a)] + [
      1 + 2 * nd, 2 + 2 * nd]
  x = x.transpose(perm).reshape(b, *[g * dd for g, dd in zip(lg, d)], n, hd)
  return x[(slice(None),) + tuple(slice(0, l) for l in spatial)]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5))
def _na_run(cfg, spatial, d, lg, tile, nt, q, k, v):
  b = q.shape[0]
  q, k, v = (_to_tiles(x, d, lg, tile, nt) for x in (q, k, v))
  if cfg.heads_major:
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  out, lse = flash_core(cfg, q, k, v)
  if cfg.heads_major:
    out = jnp.swapaxes(out, 1, 2)
  lse = jnp.swapaxes(lse, 1, 2)                       # [Bg, Tp, N, 1]
  return (_from_tiles(out, b, spatial, d, lg, tile, nt),
          _from_tiles(lse, b, spatial, d, lg, tile, nt)[..., 0])


def neighborhood_attention(query, key, value, kernel_size, *, stride=1,
                           dilation=1, is_causal=False,
                           scale: Optional[float] = None, tile_size=None,
                           interpret: Optional[bool] = None,
                           heads_major: Optional[bool] = None,
                           return_lse: bool = False):
  """Neighborhood attention over 1, 2 or 3 spatial dims (NATTEN semantics).

  Args:
    query: [B, *spatial, N, H]; key/value [B, *spatial, K, H|Hv], N % K == 0.
    kernel_size, stride, dilation: int or per-axis tuple; kernel_size *
      dilation must not exceed the axis size, stride <= kernel_size.
    is_causal: bool or per-axis tuple.
    scale: default 1/sqrt(H).
    tile_size: pixels per axis of a kernel tile (1D: tile, (tile,) or
      (1, tile)); None: about 128 pixels (see `_default_tile`).
    interpret: Pallas interpret mode; None -> True on CPU.
    return_lse: also return the log-sum-exp, float32 [B, *spatial, N].

  Returns [B, *spatial, N, Hv] in query.dtype (and the lse). Differentiable.
  """
  nd, spatial, ks, st, dl, ca = _check(query, key, value, kernel_size, stride,
                                       dilation, is_causal)
  lg = tuple(cdiv(l, d) for l, d in zip(spatial, dl))
  interpret = resolve_interpret(interpret)
  if tile_size is None:
    small = (target_platform() == "gpu" and not interpret
             and query.dtype.itemsize >= 4)
    tile = _default_tile(lg, small)
  else:
    tile = _tile_size(tile_size, nd)
  nt = tuple(cdiv(g, t) for g, t in zip(lg, tile))
  if heads_major is None:
    heads_major = interpret or target_platform() != "gpu"
  tsz = _prod(tile)
  cfg = FlashConfig(scale=default_scale(scale, query.shape[-1]),
                    left=math.inf, right=math.inf,
                    kv_len=_prod(nt) * tsz, bq=tsz, bk=tsz, bq_bwd=tsz,
                    bk_bwd=tsz, interpret=interpret,
                    platform=target_platform(),
                    heads_major=bool(heads_major),
                    groups=query.shape[-2] // key.shape[-2],
                    na=NeighborhoodTiling(nt, tile, ks, st, dl, spatial, ca))
  out, lse = _na_run(cfg, spatial, dl, lg, tile, nt, query, key, value)
  return (out, lse) if return_lse else out


def neighborhood_mask_np(spatial, kernel_size, dilation=1, is_causal=False,
                         stride=1):
  """numpy bool [S, S] (row-major flattening) mask from the window rule."""
  spatial = tuple(spatial)
  nd = len(spatial)
  ks = _tuple("kernel_size", kernel_size, nd, 1)
  st = _tuple("stride", stride, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  ca = _tuple("is_causal", is_causal, nd, kind=bool)
  m = np.ones((1, 1), bool)
  for l, k, s, d, c in zip(spatial, ks, st, dl, ca):
    i = np.arange(l)
    first, last = na_window(i // d, na_group_length(l, i % d, d), k, s, c)
    jp = i[None, :] // d
    ax = ((i[None, :] % d == i[:, None] % d) & (jp >= first[:, None])
          & (jp <= last[:, None]))
    m = (m[:, None, :, None] & ax[None, :, None, :]).reshape(
        m.shape[0] * l, m.shape[1] * l)
  return m


def visited_fraction(spatial, kernel_size, *, stride=1, dilation=1,
                     is_causal=False, tile_size=None) -> float:
  """Fraction of (query tile, key tile) pairs that hold at least one
  neighbour pair, out of all pairs of the kernel's tiles: the least work a
  tiled kernel can do relative to dense attention over the same tiles.

  Computed from the mask (`neighborhood_mask_np`) and the kernel's tiling
  (dilation groups, then `tile_size` boxes), not from the kernel's loop
  bounds, so a benchmark can hold the kernel to it.
  """
  spatial = tuple(int(x) for x in spatial)
  nd = len(spatial)
  ks = _tuple("kernel_size", kernel_size, nd, 1)
  dl = _tuple("dilation", dilation, nd, 1)
  mask = neighborhood_mask_np(spatial, ks, dl, is_causal, stride)
  lg = tuple(cdiv(l, d) for l, d in zip(spatial, dl))
  tile = _default_tile(lg) if tile_size is None else _tile_size(tile_size, nd)
  nt = tuple(cdiv(g, t) for g, t in zip(lg, tile))
  coords = np.unravel_index(np.arange(_prod(spatial)), spatial)
  group = np.ravel_multi_index([c % d for c, d in zip(coords, dl)], dl)
  tcoord = np.ravel_multi_index(
      [(c // d) // t for c, d, t in zip(coords, dl, tile)], nt)
  tid = group * _prod(nt) + tcoord
  n_tiles = _prod(dl) * _prod(nt)
  qi, kj = np.nonzero(mask)
  pairs = np.unique(tid[qi].astype(np.int64) * n_tiles + tid[kj])
  return float(pairs.size) / float(n_tiles * n_tiles)


def neighborhood_attention_reference(query, key, value, kernel_size, *,
                                     stride=1, dilation=1, is_causal=False,
                                     scale=None):
  """Dense plain-jnp attention with the definition's [S, S] mask."""
  nd, spatial, ks, st, dl, ca = _check(query, key, value, kernel_size, stride,
                                       dilation, is_causal)
  b = query.shape[0]
  s = _prod(spatial)
  flat = lambda x: x.reshape(b, s, x.shape[-2], x.shape[-1])
  mask = jnp.asarray(neighborhood_mask_np(spatial, ks, dl, ca, st))
  out = mha_reference(flat(query), flat(key), flat(value), scale=scale,
                      mask=mask)
  return out.reshape(query.shape[:-1] + value.shape[-1:])
