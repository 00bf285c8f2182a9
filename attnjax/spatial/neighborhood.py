"""Neighborhood attention (NAT / DiNAT / GNA), 1-3 spatial dims, NATTEN semantics.

Definition, per spatial axis of length L with kernel size K, stride s and
dilation d (NATTEN requires K * d <= L and 1 <= s <= K):

* Dilation groups. Position i belongs to group g = i % d; the group is the
  sub-sequence g, g + d, g + 2d, ... of length n_g = ceil((L - g) / d), and
  i has in-group index i' = i // d. Attention never leaves the group.
* Stride (Generalized Neighborhood Attention). In-group queries are grouped
  in blocks of s; every query of a block uses the window of the block's
  leader: its centre query min(b*s + s // 2, n_g - 1) (right of centre for
  even s), or its last query min(b*s + s - 1, n_g - 1) when causal. s = 1 is
  plain neighborhood attention, s = K blocked (Swin-style) window attention.
* Non-causal window. Query i' sees the K consecutive in-group keys starting
  at clamp(leader - K // 2, 0, n_g - K): centred where possible and shifted
  inward at the borders, so every query sees exactly K keys per axis (K**ndim
  total). For even K the window has K // 2 keys before the centre and
  K // 2 - 1 after.
* Causal window (per axis). Query i' sees in-group keys
  max(leader - K + 1, 0) .. i': never a key ahead of the query, so early
  queries see fewer keys.
* Multi-dim. The neighbourhood is the Cartesian product of the per-axis
  windows. The rule itself is written once, in `pallas_kernels._rules`
  (`na_window`), and used by this module, the kernels and the tests' oracle
  mask.
* Relative position bias `rpb` [heads, 2K_1 - 1, ..., 2K_n - 1]: the logit of
  query i and key j gets rpb[h, (j'_1 - i'_1) + K_1 - 1, ...] (in-group
  offsets; NATTEN's table layout, so NAT/DiNAT weights load directly). Kept
  here although NATTEN >= 0.20 dropped it; every stride <= K keeps the
  offsets inside the table.
* Additional keys/values [B, M, K, H] / [B, M, K, Hv] (NATTEN's
  `additional_keys/values`): every query also attends to these M tokens (no
  bias); the two attentions are merged exactly through their log-sum-exps.
* `return_lse`: also returns the log-sum-exp of the (scaled, biased) logits
  over everything the query attended to, float32 [B, *spatial, N] (NATTEN's
  layout), differentiable.

Backends (`implementation=`, see attnjax._dispatch): 'xla' (the tiled XLA
computation below; config `NeighborhoodXLA(tile_size=...)`) and 'pallas' (the
fused kernel `pallas_kernels.neighborhood_attention`, 1-3D, no `rpb`; config
`NeighborhoodPallas(tile_size=..., interpret=..., heads_major=...)`). None /
'auto' runs 'xla' (the kernel's speed against it has not been measured on an
accelerator yet, so it is not picked automatically).

The 'xla' computation: queries are cut, within each dilation group, into
tiles of `tile_size` positions per axis; the union of their windows is a
contiguous run of keys per axis (at most tile + K + s - 2), gathered once per
tile. Attention is computed per tile over that run with a static mask, so
memory and FLOPs grow linearly in the number of pixels (never the S x S
matrix). While all tiles' logits are small (<= 4 MiB float32; 28x28 at 4
heads) every tile is computed at once; on larger maps (`_band_loop`) a loop
over bands of tile rows, ~1 MiB of logits per step, whose key runs start a
fixed halo before their tile in zero-padded coordinates (cut with static
slices, no gather) and whose custom VJP emits each step's gradients of its
own key rows, passing the halo rows' on to the next step (no scatter, no
image-sized carry).
`neighborhood_attention_reference` builds the dense [S, S] mask from the
definition and runs plain masked attention; it is the test oracle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import BackendConfig, Op
from attnjax._numerics import NEG
from attnjax.softmax import dot_product_attention_with_lse
from attnjax.softmax.merge import merge_attentions
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, flatten_spatial,
                                     heads_and_scale, repeat_kv,
                                     to_bool_tuple, to_tuple)
from pallas_kernels._rules import na_window

__all__ = [
    "neighborhood_attention", "neighborhood_attention_reference",
    "neighborhood_mask", "neighborhood_window_start", "NeighborhoodAttention",
    "NeighborhoodXLA", "NeighborhoodPallas", "NeighborhoodParams",
]


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NeighborhoodParams:
  """Validated per-axis window arguments of one call (hashable, static)."""
  spatial: Tuple[int, ...]
  kernel_size: Tuple[int, ...]
  stride: Tuple[int, ...]
  dilation: Tuple[int, ...]
  is_causal: Tuple[bool, ...]

  @property
  def ndim(self) -> int:
    return len(self.spatial)

  def axes(self):
    """Per axis (length, kernel_size, stride, dilation, is_causal)."""
    return zip(self.spatial, self.kernel_size, self.stride, self.dilation,
               self.is_causal)

  @classmethod
  def make(cls, spatial, kernel_size, stride=1, dilation=1, is_causal=False
           ) -> "NeighborhoodParams":
    """Validates (ValueError naming the argument, axis and sizes)."""
    spatial = tuple(int(s) for s in spatial)
    nd = len(spatial)
    ks = to_tuple("kernel_size", kernel_size, nd, minimum=1)
    st = to_tuple("stride", stride, nd, minimum=1)
    dl = to_tuple("dilation", dilation, nd, minimum=1)
    ca = to_bool_tuple("is_causal", is_causal, nd)
    for a, (l, k, s, d) in enumerate(zip(spatial, ks, st, dl)):
      if k * d > l:
        raise ValueError(
            f"kernel_size * dilation must be <= the input size on every "
            f"spatial axis; axis {a}: kernel_size={k}, dilation={d}, size={l} "
            f"(spatial shape {spatial}).")
      if s > k:
        raise ValueError(
            f"`stride` must be <= `kernel_size` on every spatial axis; axis "
            f"{a}: stride={s}, kernel_size={k}.")
    return cls(spatial, ks, st, dl, ca)


def neighborhood_window_start(length: int, kernel_size: int, dilation: int = 1,
                              is_causal: bool = False, stride: int = 1):
  """numpy int [length]: first key (absolute index) each query attends to.

  Keys are start, start + d, ..., K of them (non-causal) or up to the query
  itself (causal).
  """
  (length,) = to_tuple("length", length, 1)
  p = NeighborhoodParams.make((length,), kernel_size, stride, dilation,
                              is_causal)
  (k,), (s,), (d,), (c,) = p.kernel_size, p.stride, p.dilation, p.is_causal
  i = np.arange(length)
  g, ip = i % d, i // d
  first, _ = na_window(ip, (length - g + d - 1) // d, k, s, c)
  return g + d * first


def _axis_mask(length, kernel_size, stride, dilation, is_causal):
  """numpy bool [L, L] and int in-group offset index [L, L] for one axis."""
  d = dilation
  i = np.arange(length)
  first, last = na_window(i // d, (length - i % d + d - 1) // d, kernel_size,
                          stride, is_causal)
  jp, ip = i[None, :] // d, i[:, None] // d
  same_group = (i[None, :] % d) == (i[:, None] % d)
  inside = (jp >= first[:, None]) & (jp <= last[:, None])
  rel = np.clip(jp - ip + kernel_size - 1, 0, 2 * kernel_size - 2)
  return same_group & inside, rel


def neighborhood_mask(spatial_shape: Sequence[int], kernel_size, dilation=1,
                      is_causal=False, stride=1) -> np.ndarray:
  """Dense numpy bool [S, S] (S = prod(spatial_shape), row-major) mask.

  True where query (row) attends key (column) under NATTEN semantics.
  """
  p = NeighborhoodParams.make(spatial_shape, kernel_size, stride, dilation,
                              is_causal)
  m = np.ones((1, 1), bool)
  for l, k, s, d, c in p.axes():
    ma, _ = _axis_mask(l, k, s, d, c)
    m = (m[:, None, :, None] & ma[None, :, None, :]).reshape(
        m.shape[0] * l, m.shape[1] * l)
  return m


def _check_rpb(rpb, num_heads, ks):
  want = (num_heads,) + tuple(2 * k - 1 for k in ks)
  if tuple(rpb.shape) != want:
    raise ValueError(
        f"`rpb` must have shape [heads, 2*kernel_size-1 per axis]={want}, got "
        f"{tuple(rpb.shape)}.")


def _check_additional(query, key, additional_keys, additional_values):
  """Validates the extra tokens: [B, M, K, H] / [B, M, K, Hv]."""
  if (additional_keys is None) != (additional_values is None):
    raise ValueError(
        "`additional_keys` and `additional_values` must be given together, "
        f"got additional_keys={type(additional_keys).__name__}, "
        f"additional_values={type(additional_values).__name__}.")
  if additional_keys is None:
    return
  ak, av = additional_keys, additional_values
  b, kh, h = query.shape[0], key.shape[-2], query.shape[-1]
  shapes = (f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
            f"additional_keys={tuple(ak.shape)}, "
            f"additional_values={tuple(av.shape)}")
  if (ak.ndim != 4 or av.ndim != 4 or ak.shape[0] != b or av.shape[0] != b
      or ak.shape[1] != av.shape[1] or ak.shape[2] != kh or av.shape[2] != kh
      or ak.shape[3] != h):
    raise ValueError(
        "`additional_keys`/`additional_values` must be [batch, tokens, "
        "kv_heads, head_dim] / [batch, tokens, kv_heads, v_head_dim] with the "
        f"batch, kv heads and head_dim of `key`, got {shapes}.")
  for nm, x in (("additional_keys", ak), ("additional_values", av)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"`{nm}` must be floating point, got dtype {x.dtype}.")


# ----------------------------------------------------------------------------
# Reference (test oracle): dense [S, S + M] attention from the definition
# ----------------------------------------------------------------------------

def _dense_rpb_bias(rpb, p: NeighborhoodParams):
  """bias[h, S, S] from the table (in-group offsets per axis)."""
  nd, spatial = p.ndim, p.spatial
  idx = []
  for a, (l, k, s, d, c) in enumerate(p.axes()):
    r = _axis_mask(l, k, s, d, c)[1]
    shape = [1] * (2 * nd)
    shape[a], shape[nd + a] = r.shape
    idx.append(np.broadcast_to(r.reshape(shape), spatial + spatial))
  n, size = rpb.shape[0], int(np.prod(spatial))
  bias = rpb.astype(jnp.float32)[(slice(None),) + tuple(idx)]
  return bias.reshape(n, size, size)


def neighborhood_attention_reference(query, key, value, kernel_size, *,
                                     stride=1, dilation=1, is_causal=False,
                                     scale=None, rpb=None,
                                     additional_keys=None,
                                     additional_values=None,
                                     return_lse: bool = False):
  """Dense masked attention with the definition's [S, S] mask (test oracle).

  Additional tokens are extra key columns (always visible, no bias), so this
  does not use the log-sum-exp merge of `neighborhood_attention`.
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  p = NeighborhoodParams.make(query.shape[1:1 + nd], kernel_size, stride,
                              dilation, is_causal)
  _check_additional(query, key, additional_keys, additional_values)
  scale = default_scale(scale, query.shape[-1])
  b, size = query.shape[0], int(np.prod(p.spatial))
  q = flatten_spatial(query).astype(jnp.float32)
  k = repeat_kv(flatten_spatial(key), n).astype(jnp.float32)
  v = repeat_kv(flatten_spatial(value), n).astype(jnp.float32)
  mask = jnp.asarray(neighborhood_mask(p.spatial, p.kernel_size, p.dilation,
                                       p.is_causal, p.stride))
  bias = jnp.zeros((n, size, size), jnp.float32)
  if rpb is not None:
    _check_rpb(rpb, n, p.kernel_size)
    bias = _dense_rpb_bias(rpb, p)
  if additional_keys is not None:
    m = additional_keys.shape[1]
    k = jnp.concatenate(
        [k, repeat_kv(additional_keys, n).astype(jnp.float32)], axis=1)
    v = jnp.concatenate(
        [v, repeat_kv(additional_values, n).astype(jnp.float32)], axis=1)
    mask = jnp.concatenate([mask, jnp.ones((size, m), bool)], axis=1)
    bias = jnp.concatenate([bias, jnp.zeros((n, size, m), jnp.float32)], -1)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale + bias[None]
  logits = jnp.where(mask, logits, NEG)
  lse = jax.nn.logsumexp(logits, axis=-1, where=mask)
  probs = jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0)
  out = jnp.einsum("bnts,bsnh->btnh", probs, v).astype(query.dtype)
  out = out.reshape(query.shape[:-1] + value.shape[-1:])
  if not return_lse:
    return out
  return out, jnp.moveaxis(lse, 1, -1).reshape(b, *p.spatial, n)


# ----------------------------------------------------------------------------
# Backend 'xla': tiled computation
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class AxisPlan:
  """Static tiling of one axis (positions are in-group indices).

  group_len: padded in-group length ceil(L / d); num_tiles x tile query
  positions per group; `run` keys gathered per tile, starting at
  key_index[g, t, 0]; mask/rel [d, num_tiles, tile, run]: the window mask and
  the rpb offset index of every (query, gathered key) pair.
  """
  group_len: int
  num_tiles: int
  tile: int
  run: int
  key_index: np.ndarray
  mask: np.ndarray
  rel: np.ndarray


def _tile_windows(length, kernel_size, stride, dilation, is_causal, tile):
  """Per-axis tiling shared by `_axis_plan` and `_halo_plan`: (group length
  lg, number of tiles nt, tile, windows), windows a list of (g, t, clamped
  queries, valid, first key, last key) per dilation group g and tile t."""
  d = dilation
  lg = -(-length // d)
  tile = max(1, min(tile, lg))
  nt = -(-lg // tile)
  windows = []
  for g in range(d):
    n_g = -(-(length - g) // d)
    for t in range(nt):
      q = np.arange(t * tile, t * tile + tile)
      valid = q < n_g
      qc = np.minimum(q, n_g - 1)
      first, last = na_window(qc, n_g, kernel_size, stride, is_causal)
      windows.append((g, t, qc, valid, first, last))
  return lg, nt, tile, windows


def _run_mask_rel(window, cols, kernel_size):
  """bool [tile, run] mask and int32 [tile, run] rpb offsets of one tile's
  key run `cols` (positions in its dilation group)."""
  _, _, qc, valid, first, last = window
  mask = (valid[:, None] & (cols[None, :] >= first[:, None]) &
          (cols[None, :] <= last[:, None]))
  rel = np.clip(cols[None, :] - qc[:, None] + kernel_size - 1, 0,
                2 * kernel_size - 2)
  return mask, rel


@functools.lru_cache(maxsize=256)
def _axis_plan(length, kernel_size, stride, dilation, is_causal, tile
               ) -> AxisPlan:
  d, k = dilation, kernel_size
  lg, nt, tile, windows = _tile_windows(length, k, stride, d, is_causal, tile)
  run = max([1] + [int(last.max()) - int(first.min()) + 1
                   for *_, first, last in windows])
  run = min(run, lg)
  kidx = np.zeros((d, nt, run), np.int32)
  mask = np.zeros((d, nt, tile, run), bool)
  rel = np.zeros((d, nt, tile, run), np.int32)
  for w in windows:
    g, t, first = w[0], w[1], w[4]
    cols = min(int(first.min()), lg - run) + np.arange(run)
    kidx[g, t] = cols
    mask[g, t], rel[g, t] = _run_mask_rel(w, cols, k)
  return AxisPlan(lg, nt, tile, run, kidx, mask, rel)


def _axis_layout(arr, a, nd):
  """Places per-axis array dims [d, nT, (T), (run)] into the joint layout
  [d_1..d_n, nT_1..nT_n, T_1..T_n, run_1..run_n] (size 1 on other axes)."""
  shape = [1] * (arr.ndim * nd)
  for gi in range(arr.ndim):
    shape[gi * nd + a] = arr.shape[gi]
  return arr.reshape(shape)


def _tile_queries(query, plans, dl):
  """[B, *spatial, N, H] -> [B, d.., nT.., N, T.., H] (zero-padded)."""
  nd, b = len(plans), query.shape[0]
  spatial = query.shape[1:1 + nd]
  pads = [(0, 0)] + [(0, p.num_tiles * p.tile * d - l)
                     for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
  q = jnp.pad(query, pads)
  shape = [b]
  for p, d in zip(plans, dl):
    shape += [p.num_tiles, p.tile, d]
  q = q.reshape(*shape, *query.shape[-2:])
  perm = ([0] + [3 + 3 * a for a in range(nd)] + [1 + 3 * a for a in range(nd)]
          + [1 + 3 * nd] + [2 + 3 * a for a in range(nd)] + [2 + 3 * nd])
  return q.transpose(perm)


def _split_groups(x, plans, dl, spatial):
  """[B, *spatial, N, C] -> [B, (lg, d).., N, C]: each axis zero-padded to
  lg * d and split into (position in group, dilation group)."""
  b = x.shape[0]
  pads = [(0, 0)] + [(0, p.group_len * d - l)
                     for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
  x = jnp.pad(x, pads)
  shape = [b]
  for p, d in zip(plans, dl):
    shape += [p.group_len, d]
  return x.reshape(*shape, *x.shape[-2:])


def _gather_key_runs(x, plans, dl):
  """[B, *spatial, N, C] -> [B, d.., nT.., N, run.., C]: each query tile's
  key run, gathered axis by axis."""
  nd = len(plans)
  x = _split_groups(x, plans, dl, x.shape[1:1 + nd])
  # x: [B, (lg, d)*nd, N, C]; processed axes become (d, nT, run) triples.
  for a, (p, d) in enumerate(zip(plans, dl)):
    if p.num_tiles == 1 and d == 1 and p.run == p.group_len:
      # one tile whose run is the whole axis: (lg, 1) -> (1, 1, lg), no gather
      at = 1 + 3 * a
      x = x.reshape(x.shape[:at] + (1, 1, p.run) + x.shape[at + 2:])
      continue
    grp = np.arange(d, dtype=np.int32)[:, None, None]
    x = x[(slice(None),) * (1 + 3 * a) + (p.key_index, grp)]
  perm = ([0] + [1 + 3 * a for a in range(nd)] + [2 + 3 * a for a in range(nd)]
          + [1 + 3 * nd] + [3 + 3 * a for a in range(nd)] + [2 + 3 * nd])
  return x.transpose(perm)


def _joint(plans, dl):
  """Full joint-layout shape and (tile size, run size) in elements."""
  full = tuple(dl) + tuple(p.num_tiles for p in plans) + tuple(
      p.tile for p in plans) + tuple(p.run for p in plans)
  return (full, int(np.prod([p.tile for p in plans])),
          int(np.prod([p.run for p in plans])))


def _joint_mask(plans, dl, xp=np):
  """bool [G, 1, tq, tk] (G = groups x tiles) in the joint layout (numpy, or
  jnp where a plan's mask is traced: the row loop's axis-0 tile)."""
  nd = len(plans)
  full, tq, tk = _joint(plans, dl)
  mask = None
  for a, p in enumerate(plans):
    ma = _axis_layout(p.mask, a, nd)
    mask = ma if mask is None else (mask & ma)
  return xp.broadcast_to(mask, full).reshape(-1, 1, tq, tk)


def _joint_bias(rpb, plans, dl, xp=np):
  """float32 [G, N, tq, tk] rpb bias in the joint layout."""
  nd = len(plans)
  full, tq, tk = _joint(plans, dl)
  idx = tuple(xp.broadcast_to(_axis_layout(p.rel, a, nd), full)
              for a, p in enumerate(plans))
  bias = rpb.astype(jnp.float32)[(slice(None),) + idx]  # [N, *full]
  return bias.reshape(rpb.shape[0], -1, tq, tk).transpose(1, 0, 2, 3)


def _untile(x, plans, dl, spatial):
  """[B, d.., nT.., N, T.., C] -> [B, *spatial, N, C] (crops the padding)."""
  nd, b = len(plans), x.shape[0]
  n, c = x.shape[1 + 2 * nd], x.shape[-1]
  perm = [0]
  for a in range(nd):
    perm += [1 + nd + a, 2 + 2 * nd + a, 1 + a]
  perm += [1 + 2 * nd, 2 + 3 * nd]
  x = x.transpose(perm)
  x = x.reshape(b, *[p.num_tiles * p.tile * d for p, d in zip(plans, dl)],
                n, c)
  return x[(slice(None),) + tuple(slice(0, l) for l in spatial)]


def _with_ones(value):
  """[..., Hv] -> [..., Hv + 1]: a ones channel appended, so the P V product
  of `_tiled_softmax_attention` also gives the softmax row sums."""
  return jnp.concatenate(
      [value, jnp.ones(value.shape[:-1] + (1,), value.dtype)], axis=-1)


def _tiled_softmax_attention(q, k, v1, mask, bias, scale):
  """Per-tile masked attention: q [B, G, N, tq, H], k [B, G, N, tk, H], v1
  [B, G, N, tk, Hv + 1] (the values with a ones channel, `_with_ones`),
  mask [G, 1, tq, tk] -> (out float32 [B, G, N, tq, Hv], lse [B, G, N, tq]).

  Rows with nothing to attend (tile padding) give zeros and lse = NEG.
  Written for few passes over the [tq, tk] logits (XLA:CPU writes each
  materialized one out; at 112x112 they are 34 MiB, far over the caches):
  the product, the masked row max reading it, the masked exp writing the
  unnormalized weights, and their product with v1, whose last channel is
  the row sum (a separate sum would either read the weights again or make
  XLA recompute the exp inside it); the [tq, Hv] output is normalized
  instead of the [tq, tk] weights."""
  logits = jnp.einsum("bgnqh,bgnkh->bgnqk", q, k,
                      preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias[None]
  ok = jnp.asarray(mask)[None]
  m = jnp.max(jnp.where(ok, logits, NEG), axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(m > 0.5 * NEG, m, 0.0))
  e = jnp.where(ok, jnp.exp(logits - m), 0.0)
  ol = jnp.einsum("bgnqk,bgnkh->bgnqh", e.astype(v1.dtype), v1,
                  preferred_element_type=jnp.float32)
  s = ol[..., -1:]
  has = s > 0
  s_safe = jnp.where(has, s, 1.0)
  out = ol[..., :-1] / s_safe
  lse = jnp.where(has, m + jnp.log(s_safe), NEG)[..., 0]
  return out, lse


def _band_tile(stride):
  """Default query tile (per axis) of the band loop: the smallest multiple
  of the stride that is >= 4. Each tile computes logits against a run of
  tile + K + stride - 2 keys at most (K - 1 + tile for stride 1), so smaller
  tiles waste fewer logits per query: 4 -> 10x10 = 100 per query at K=7
  (7 -> 169), and a tile of whole stride blocks shares one window (stride 4,
  K=7: runs of 10 with the border windows' inward shifts, 7x7 tiles: 16,
  256 logits per query). Measured faster than max(K, 4) on large maps
  (docs/benchmarks/cpu_perf.md, issue 22 item 3, NA7)."""
  return stride * -(-4 // stride)


def _xla_tiles(config, nd, ks):
  if config is None or config.tile_size is None:
    return tuple(max(k, 4) for k in ks)
  return to_tuple("tile_size", config.tile_size, nd)


def _row_loop(query, key, value, plans, dl, spatial, scale, rpb):
  """The tiled computation as a loop over the first axis' tile rows.

  Each step takes one row of query tiles (tile_0 positions of axis 0, every
  position of the other axes) and the run_0 key rows its windows need
  (sliced once outside the loop: run_0 / tile_0 ~ 1.9x the keys for K = 7,
  instead of the ~3.4x of every tile's 2D run), then gathers the other axes'
  runs, masks and attends inside the step, so the per-tile logits and key
  runs of one step stay in cache whatever the image size. The step is
  rematerialized in the backward (jax.checkpoint): the loop saves only its
  inputs, and each step's input cotangents are its own outputs (no
  full-size carry). Same tiles, masks and arithmetic as the unrolled path.
  """
  p0, d0, nd = plans[0], dl[0], len(plans)
  b, n, h = query.shape[0], query.shape[-2], query.shape[-1]
  hv = value.shape[-1]
  steps = d0 * p0.num_tiles
  # queries: [B, (nT0, T0, d0), P_1.., N, H] -> [steps, B, T0, P_1.., N, H]
  pads = [(0, 0)] + [(0, p.num_tiles * p.tile * d - l)
                     for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
  q = jnp.pad(query, pads)
  rest_q = q.shape[2:]
  q = q.reshape(b, p0.num_tiles, p0.tile, d0, *rest_q)
  q = q.transpose((3, 1, 0, 2) + tuple(range(4, 4 + len(rest_q))))
  q = q.reshape(steps, b, p0.tile, *rest_q)

  def key_rows(x):
    """[B, *spatial, N, C] -> [steps, run_0, B, L_1.., N, C]."""
    pads = [(0, 0)] + [(0, p.group_len * d - l)
                       for p, d, l in zip(plans, dl, spatial)] + [(0, 0)] * 2
    x = jnp.pad(x, pads)
    rest = x.shape[2:]
    x = x.reshape(b, p0.group_len, d0, *rest)
    x = x.transpose((1, 2, 0) + tuple(range(3, 3 + len(rest))))
    x = x[p0.key_index, np.arange(d0, dtype=np.int32)[:, None, None]]
    return x.reshape(steps, p0.run, b, *rest)

  k, v = key_rows(key), key_rows(_with_ones(value))
  m0 = jnp.asarray(p0.mask.reshape(steps, p0.tile, p0.run))
  r0 = jnp.asarray(p0.rel.reshape(steps, p0.tile, p0.run))
  # Inside a step axis 0 is one tile of tile_0 queries over run_0 keys (the
  # step's mask and rpb offsets come in as loop inputs).
  sub_dl = (1,) + tuple(dl[1:])
  sub_spatial = (p0.tile,) + tuple(spatial[1:])
  _, tq, tk = _joint(
      [AxisPlan(p0.run, 1, p0.tile, p0.run, None, None, None)] + plans[1:],
      sub_dl)

  def step(qs, ks, vs, ms, rs, rpb):
    p0s = AxisPlan(p0.run, 1, p0.tile, p0.run, None, ms[None, None],
                   rs[None, None])
    sub = [p0s] + list(plans[1:])
    ks, vs = jnp.moveaxis(ks, 0, 1), jnp.moveaxis(vs, 0, 1)
    qt = _tile_queries(qs, sub, sub_dl)
    kt = _gather_key_runs(ks, sub, sub_dl)
    vt = _gather_key_runs(vs, sub, sub_dl)
    lead = kt.shape[:1 + 2 * nd]
    bias = None if rpb is None else _joint_bias(rpb, sub, sub_dl, xp=jnp)
    out, lse = _tiled_softmax_attention(
        qt.reshape(b, -1, n, tq, h), kt.reshape(b, -1, n, tk, h),
        vt.reshape(b, -1, n, tk, hv + 1), _joint_mask(sub, sub_dl, xp=jnp),
        bias,
        scale)
    tshape = [pl.tile for pl in sub]
    out = _untile(out.astype(query.dtype).reshape(*lead, n, *tshape, hv),
                  sub, sub_dl, sub_spatial)
    lse = _untile(lse.reshape(*lead, n, *tshape, 1), sub, sub_dl,
                  sub_spatial)
    return out, lse[..., 0]

  step = jax.checkpoint(step, prevent_cse=False)

  def body(_, xs):
    return None, step(*xs, rpb)

  _, (out, lse) = jax.lax.scan(body, None, (q, k, v, m0, r0))

  def rows_back(x):
    """[steps, B, T0, *spatial[1:], ...] -> [B, *spatial, ...]."""
    rest = x.shape[3:]
    x = x.reshape(d0, p0.num_tiles, b, p0.tile, *rest)
    x = x.transpose((2, 1, 3, 0) + tuple(range(4, 4 + len(rest))))
    x = x.reshape(b, p0.num_tiles * p0.tile * d0, *rest)
    return x[:, :spatial[0]]

  return rows_back(out), rows_back(lse)


# ----------------------------------------------------------------------------
# Default 'xla' computation: halo runs cut with static slices, a loop over
# bands of tile rows sized to the cache
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _halo_plan(length, kernel_size, stride, dilation, is_causal, tile
               ) -> AxisPlan:
  """Like `_axis_plan`, but every tile's key run starts `hl` keys before
  the tile in zero-padded in-group coordinates: tile t's run is the padded
  positions [t*tile - hl, t*tile + tile + hr), the same offsets for every
  tile, so all runs are cut with static slices (`_runs`) instead of a
  gather, and their gradients fold back with static pads and adds.
  `key_index` holds (hl, hr); `run` = hl + tile + hr."""
  d, k = dilation, kernel_size
  lg, nt, tile, windows = _tile_windows(length, k, stride, d, is_causal, tile)
  hl = hr = 0
  for _, t, _, valid, first, last in windows:
    if valid.any():
      hl = max(hl, t * tile - int(first[valid].min()))
      hr = max(hr, int(last[valid].max()) - (t * tile + tile - 1))
  run = hl + tile + hr
  mask = np.zeros((d, nt, tile, run), bool)
  rel = np.zeros((d, nt, tile, run), np.int32)
  for w in windows:
    g, t = w[0], w[1]
    mask[g, t], rel[g, t] = _run_mask_rel(w, t * tile - hl + np.arange(run), k)
  return AxisPlan(lg, nt, tile, run, np.array([hl, hr]), mask, rel)


def _runs(x, axis, n, size, halo):
  """Runs [i*size, i*size + size + halo) of `axis`, i < n, as a new axis
  pair [..., n, size + halo, ...], with static slices only (x is cropped or
  zero-padded at the end of the axis as needed)."""
  c = -(-halo // size)
  total = (n + c) * size
  length = x.shape[axis]
  if length < total:
    x = _axis_pad(x, axis, 0, total - length)
  elif length > total:
    x = jax.lax.slice_in_dim(x, 0, total, axis=axis)
  x = x.reshape(x.shape[:axis] + (n + c, size) + x.shape[axis + 1:])
  if c == 0:
    return x
  # run i = tile i, then the first `halo` positions of tiles i+1, i+2, ...
  parts = [jax.lax.slice_in_dim(
      jax.lax.slice_in_dim(x, j, j + n, axis=axis), 0,
      min(size, size + halo - j * size), axis=axis + 1)
           for j in range(c + 1)]
  return jnp.concatenate(parts, axis=axis + 1)


def _axis_pad(x, axis, before, after):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (before, after)
  return jnp.pad(x, pad)


# float32 logits of one loop step; all tiles at once (no loop) while all
# tiles' logits stay under ALL_TILES_BYTES (docs/benchmarks/cpu_perf.md,
# fifth session: 2 MiB is a core's L2 here, 28x28 x 4 heads is 2.1 MiB).
# With the band loop's 4x4 tiles a step's key and value runs are ~2x its
# logits, and 1 MiB steps measured 9-17% less CPU time at 56x56 than 2 MiB
# (the same at 112x112; NA7, cpu_perf/na7_ab_steps.log).
STEP_LOGITS_BYTES = 1 << 20
ALL_TILES_BYTES = 4 << 20


def _band_rows(plans, dl, batch, heads, step_bytes=None):
  """Tile rows (first axis) per loop step: one step's float32 logits (all
  groups, batch, heads) about `step_bytes` (default STEP_LOGITS_BYTES), or
  all of them (no loop) while all tiles' logits are under ALL_TILES_BYTES
  (only with the default `step_bytes`)."""
  row_bytes = 4 * batch * heads * int(np.prod(dl)) * int(np.prod(
      [p.num_tiles for p in plans[1:]])) * int(np.prod(
          [p.tile for p in plans])) * int(np.prod([p.run for p in plans]))
  nt = plans[0].num_tiles
  if step_bytes is None:
    if row_bytes * nt <= ALL_TILES_BYTES:
      return nt
    step_bytes = STEP_LOGITS_BYTES
  return max(1, min(nt, step_bytes // max(row_bytes, 1)))


def _band_loop(query, key, value, plans, dl, spatial, scale, rpb, r):
  """The 'xla' computation on large maps (`_halo_plan` tiles): a
  `lax.scan` over bands of `r` tile rows (first axis), sized so that one
  step's logits stay in a core's L2 (`_band_rows`). Queries are tiled once
  outside the loop; each step cuts its key/value rows (band + halo) from the
  zero-padded keys with a dynamic slice and the per-tile key runs with
  static slices, and attends per tile with `_tiled_softmax_attention`;
  outputs and log-sum-exps are the scan's per-step outputs. A custom VJP
  (`_band_core`): the backward loop recomputes each step's weights from the
  saved log-sum-exp and emits the step's query gradient and the gradients
  of its own key/value rows (band rows) as per-step outputs; the gradients
  of the halo rows below the band go on to the next step in a carry of
  halo rows (no gather, no scatter, no image-sized carry; per-step band +
  halo rows folded after the loop held 1.5-3x the keys' size).

  Keys and values stay in the image's own order, each axis only padded and
  split into (in-group position, dilation group) by a reshape
  (`_split_axes`); the dilation groups are separated inside the steps, by
  the same copy that lays out the key runs, and the queries' tiling and the
  output's untiling are one transpose each, as without dilation (a separate
  transpose into group-major order cost ~4 ms per 112x112 array here)."""
  nd, b, n = len(plans), query.shape[0], query.shape[-2]
  h = query.shape[-1]
  p0, rest = plans[0], plans[1:]
  halos = [tuple(int(i) for i in p.key_index) for p in plans]
  halo = [sum(hh) for hh in halos]
  steps = -(-p0.num_tiles // r)
  band = r * p0.tile
  rows = steps * band
  tshape = [p.tile for p in plans]
  ntiles = [r] + [p.num_tiles for p in rest]
  # rows a step cuts: whole tiles, so its runs need no padding inside it
  cut0 = (r + -(-halo[0] // p0.tile)) * p0.tile
  qlen = [rows] + [p.num_tiles * p.tile for p in rest]
  klen = [rows - band + cut0] + [
      (p.num_tiles + -(-hh // p.tile)) * p.tile for p, hh in zip(rest,
                                                                halo[1:])]

  def split_axes(x, before, lengths):
    """[B, *spatial, N, C] -> [B, P_0, d_0, .., P_n, d_n, N, C]: axis a
    zero-padded by before[a] in-group positions in front and to lengths[a]
    in-group positions in all, then split (a reshape) into (in-group
    position, dilation group)."""
    pads = [(0, 0)] + [(f * d, (ln - f) * d - l) for f, ln, d, l in zip(
        before, lengths, dl, spatial)] + [(0, 0)] * 2
    x = jnp.pad(x, pads)
    return x.reshape((b,) + sum(((ln, d) for ln, d in zip(lengths, dl)), ())
                     + x.shape[-2:])

  # queries [B, (steps, r, T_0, d_0), (n_a, T_a, d_a).., N, H]
  #   -> [steps, B, d.., n.., N, T.., H] -> [steps, B, G, N, tq, H]
  q = split_axes(query, [0] * nd, qlen)
  q = q.reshape((b, steps) + sum(((nt, t, d) for nt, t, d in zip(
      ntiles, tshape, dl)), ()) + (n, h))
  qperm = ([1, 0] + [4 + 3 * a for a in range(nd)]
           + [2 + 3 * a for a in range(nd)] + [2 + 3 * nd]
           + [3 + 3 * a for a in range(nd)] + [3 + 3 * nd])
  q = q.transpose(qperm).reshape(steps, b, -1, n, int(np.prod(tshape)), h)

  # the first axis' mask / rpb offsets per step: [steps, d0, r, T0, run0]
  def per_step(a):
    extra = steps * r - p0.num_tiles
    a = np.pad(a, ((0, 0), (0, extra), (0, 0), (0, 0)))
    return np.moveaxis(a.reshape(a.shape[0], steps, r, *a.shape[2:]), 1, 0)
  m0, r0 = per_step(p0.mask), per_step(p0.rel)
  sub_plan = lambda m, rel: [AxisPlan(p0.group_len, r, p0.tile, p0.run, None,
                                      m, rel)] + rest
  masks = np.stack([_joint_mask(sub_plan(m0[s], None), dl)
                    for s in range(steps)])      # [steps, G, 1, tq, tk]
  geo = _BandGeometry(nd, b, n, band, cut0, tuple(ntiles), tuple(tshape),
                      tuple(halo), masks, r0, sub_plan, tuple(dl), scale)
  before = [hl for hl, _ in halos]
  out, lse = _band_core(geo, q, split_axes(key, before, klen),
                        split_axes(value, before, klen), rpb)

  def image(x):
    # [steps, B, G, N, tq, C] -> [steps, B, d.., n.., N, T.., C]
    # -> [B, (steps, r, T_0, d_0), (n_a, T_a, d_a).., N, C] -> [B, *spatial,
    # N, C]
    x = x.reshape((steps, b) + tuple(dl) + tuple(ntiles) + (n,)
                  + tuple(tshape) + x.shape[-1:])
    x = x.transpose(np.argsort(qperm))
    x = x.reshape((b,) + tuple(ln * d for ln, d in zip(qlen, dl))
                  + (n, x.shape[-1]))
    return x[(slice(None),) + tuple(slice(0, l) for l in spatial)]
  return image(out.astype(query.dtype)), image(lse[..., None])[..., 0]


@dataclasses.dataclass(frozen=True, eq=False)
class _BandGeometry:
  """Static description of a band loop (hashable by identity). Keys are
  [B, P_0, d_0, .., P_n, d_n, N, C] (`_band_loop`); a step cuts `cut0`
  first-axis positions from step * band."""
  nd: int
  b: int
  n: int
  band: int
  cut0: int
  ntiles: tuple
  tshape: tuple
  halo: tuple
  masks: np.ndarray
  r0: np.ndarray
  sub_plan: object
  dl: tuple
  scale: float

  def band_rows(self, x, s):
    """First-axis positions [s*band, s*band + cut0) of the padded keys."""
    return jax.lax.dynamic_slice_in_dim(x, s * self.band, self.cut0, axis=1)

  def tile_runs(self, x):
    """[B, P_0, d_0, .., N, C] (band rows) -> [B, G, N, tk, C]: runs per
    axis, then (d.., n.., N, run.., C) order, groups apart."""
    nd = self.nd
    for a in range(nd):
      x = _runs(x, 1 + 3 * a, self.ntiles[a], self.tshape[a], self.halo[a])
    # x: [B, (n_a, run_a, d_a).., N, C]
    x = x.transpose([0] + [3 + 3 * a for a in range(nd)]
                    + [1 + 3 * a for a in range(nd)] + [1 + 3 * nd]
                    + [2 + 3 * a for a in range(nd)] + [2 + 3 * nd])
    return x.reshape(self.b, -1, self.n, self.masks.shape[-1], x.shape[-1])

  def bias(self, rpb, rs):
    if rpb is None:
      return None
    return _joint_bias(rpb, self.sub_plan(None, rs), self.dl, xp=jnp)


def _band_fwd_loop(geo, q, k, v, rpb):
  def body(_, xs):
    s, qt, mask, rs = xs
    kt = geo.tile_runs(geo.band_rows(k, s))
    vt = geo.tile_runs(_with_ones(geo.band_rows(v, s)))
    out, lse = _tiled_softmax_attention(qt, kt, vt, mask, geo.bias(rpb, rs),
                                        geo.scale)
    return None, (out.astype(q.dtype), lse)
  steps = q.shape[0]
  _, (out, lse) = jax.lax.scan(
      body, None, (jnp.arange(steps), q, geo.masks, geo.r0))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _band_core(geo, q, k, v, rpb):
  """(out [steps, B, G, N, tq, Hv] q.dtype, lse float32 [steps, B, G, N,
  tq]) of tiled queries q [steps, B, G, N, tq, H] against padded keys /
  values (`_band_loop`)."""
  return _band_fwd_loop(geo, q, k, v, rpb)


def _band_core_fwd(geo, q, k, v, rpb):
  out, lse = _band_fwd_loop(geo, q, k, v, rpb)
  return (out, lse), (q, k, v, rpb, out, lse)


def _band_core_bwd(geo, res, cts):
  q, k, v, rpb, out, lse = res
  dout, dlse = cts
  f32 = jnp.float32
  steps = q.shape[0]

  halo = geo.cut0 - geo.band

  def body(carry, xs):
    drpb, ck, cv = carry
    s, qt, ot, lt, dot, dlt, mask, rs = xs
    kb, vb = geo.band_rows(k, s), geo.band_rows(v, s)
    kt, vt = geo.tile_runs(kb), geo.tile_runs(vb)
    logits = jnp.einsum("bgnqh,bgnkh->bgnqk", qt, kt,
                        preferred_element_type=f32) * geo.scale
    bias, bias_vjp = (None, None) if rpb is None else jax.vjp(
        lambda t: geo.bias(t, rs), rpb)
    if bias is not None:
      logits = logits + bias[None]
    ok = jnp.asarray(mask)[None]
    p = jnp.where(ok, jnp.exp(logits - lt[..., None]), 0.0)
    dof = dot.astype(f32)
    delta = jnp.sum(dof * ot.astype(f32), axis=-1) - dlt.astype(f32)
    dp = jnp.einsum("bgnqh,bgnkh->bgnqk", dof, vt,
                    preferred_element_type=f32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("bgnqk,bgnkh->bgnqh", ds, kt,
                    preferred_element_type=f32) * geo.scale
    dkt = jnp.einsum("bgnqk,bgnqh->bgnkh", ds, qt,
                     preferred_element_type=f32) * geo.scale
    dvt = jnp.einsum("bgnqk,bgnqh->bgnkh", p, dof,
                     preferred_element_type=f32)
    _, runs_vjp = jax.vjp(geo.tile_runs, kb.astype(f32))
    dkb, = runs_vjp(dkt)
    _, runs_vjp = jax.vjp(geo.tile_runs, vb.astype(f32))
    dvb, = runs_vjp(dvt)
    if bias_vjp is not None:
      drpb = drpb + bias_vjp(jnp.sum(ds, axis=0))[0].astype(f32)

    def own_rows(db, c):
      # the earlier steps' halo gradients of this step's first rows are
      # added in; rows past the band go on to the next step
      db = db + _axis_pad(c, 1, 0, geo.cut0 - halo)
      return db[:, :geo.band], db[:, geo.band:]
    dk, ck = own_rows(dkb, ck)
    dv, cv = own_rows(dvb, cv)
    return (drpb, ck, cv), (dq.astype(q.dtype), dk.astype(k.dtype),
                            dv.astype(v.dtype))

  drpb0 = None if rpb is None else jnp.zeros(rpb.shape, f32)
  zeros = lambda x: jnp.zeros((x.shape[0], halo) + x.shape[2:], f32)
  (drpb, ck, cv), (dq, dk, dv) = jax.lax.scan(
      body, (drpb0, zeros(k), zeros(v)),
      (jnp.arange(steps), q, out, lse, dout, dlse, geo.masks, geo.r0))

  def rows(own, c, x):
    # [steps, B, band, ...] + the last halo -> [B, steps * band + halo, ...]
    own = jnp.moveaxis(own, 0, 1).reshape((x.shape[0], -1) + x.shape[2:])
    return jnp.concatenate([own, c.astype(x.dtype)], axis=1)
  return (dq, rows(dk, ck, k), rows(dv, cv, v),
          None if rpb is None else drpb.astype(rpb.dtype))


_band_core.defvjp(_band_core_fwd, _band_core_bwd)


def _xla_backend(config, query, key, value, params, scale, rpb):
  """(out [B, *spatial, N, Hv] query.dtype, lse float32 [B, *spatial, N])."""
  p, n = params, query.shape[-2]
  nd, dl = p.ndim, p.dilation
  tiles = _xla_tiles(config, nd, p.kernel_size)
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  if config is None or config.row_loop is None:
    hplans = [_halo_plan(l, k, s, d, c, t)
              for (l, k, s, d, c), t in zip(p.axes(), tiles)]
    step_bytes = None if config is None else config.step_bytes
    r = _band_rows(hplans, dl, query.shape[0], n, step_bytes)
    if r < hplans[0].num_tiles:
      if config is None or config.tile_size is None:
        hplans = [_halo_plan(l, k, s, d, c, _band_tile(s))
                  for l, k, s, d, c in p.axes()]
        r = _band_rows(hplans, dl, query.shape[0], n,
                       STEP_LOGITS_BYTES if step_bytes is None
                       else step_bytes)
      return _band_loop(query, key, value, hplans, dl, p.spatial, scale, rpb,
                        r)
  plans = [_axis_plan(l, k, s, d, c, t)
           for (l, k, s, d, c), t in zip(p.axes(), tiles)]
  if config is not None and config.row_loop:
    return _row_loop(query, key, value, plans, dl, p.spatial, scale, rpb)
  b, h, hv = query.shape[0], query.shape[-1], value.shape[-1]
  q = _tile_queries(query, plans, dl)
  k = _gather_key_runs(key, plans, dl)
  v = _gather_key_runs(_with_ones(value), plans, dl)
  lead = k.shape[:1 + 2 * nd]
  _, tq, tk = _joint(plans, dl)
  bias = None if rpb is None else _joint_bias(rpb, plans, dl)
  out, lse = _tiled_softmax_attention(
      q.reshape(b, -1, n, tq, h), k.reshape(b, -1, n, tk, h),
      v.reshape(b, -1, n, tk, hv + 1), _joint_mask(plans, dl), bias, scale)
  tshape = [pl.tile for pl in plans]
  out = _untile(out.astype(query.dtype).reshape(*lead, n, *tshape, hv),
                plans, dl, p.spatial)
  lse = _untile(lse.reshape(*lead, n, *tshape, 1), plans, dl, p.spatial)
  return out, lse[..., 0]


@dataclasses.dataclass(frozen=True)
class NeighborhoodXLA(BackendConfig):
  """'xla' backend tuning: query tile per axis (int or tuple; None: max(K, 4)
  per axis for all tiles at once, the smallest multiple of the stride >= 4
  in the band loop, `_band_tile`). `row_loop=None` (default): all tiles at
  once while their float32 logits (max(K, 4) tiles) are <= 4 MiB, else the
  band loop with `step_bytes` of
  logits per step (None: 1 MiB; giving `step_bytes` always loops, at least
  one tile row per step). `row_loop=False`: all tiles at once at every size
  (the earlier default: at 112x112, 4 heads x 32, 86 / 190 MiB temp forward /
  forward+backward, mapped fresh on every call). `row_loop=True`: the older
  one-row-per-step loop (autodiff backward, in-step gathers; measured slower).
  docs/benchmarks/cpu_perf.md (item 3) has the measurements. Results do not
  depend on any setting."""
  backend: ClassVar[str] = "xla"
  tile_size: Optional[object] = None
  row_loop: Optional[bool] = None
  step_bytes: Optional[int] = None


# ----------------------------------------------------------------------------
# Backend 'pallas': the fused kernel (pallas_kernels/neighborhood.py)
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NeighborhoodPallas(BackendConfig):
  """'pallas' backend tuning: `tile_size` pixels per axis of one kernel tile
  (None: the kernel's per-platform default), `interpret` (None: True on
  CPU), `heads_major` (None: the kernel's per-platform layout)."""
  backend: ClassVar[str] = "pallas"
  tile_size: Optional[object] = None
  interpret: Optional[bool] = None
  heads_major: Optional[bool] = None


def _pallas_backend(config, query, key, value, params, scale, rpb):
  if rpb is not None:
    raise NotImplementedError(
        "neighborhood_attention(implementation='pallas') takes no relative "
        "position bias `rpb` (use 'xla')")
  from pallas_kernels import neighborhood as pallas_na
  config = config or NeighborhoodPallas()
  p = params
  return pallas_na.neighborhood_attention(
      query, key, value, p.kernel_size, stride=p.stride, dilation=p.dilation,
      is_causal=p.is_causal, scale=scale, tile_size=config.tile_size,
      interpret=config.interpret, heads_major=config.heads_major,
      return_lse=True)


# Auto order: 'xla' (serves every call). The fused kernel is not chosen
# automatically: it is interpreted on CPU, and its speed against 'xla' has
# not been measured on an accelerator here; pass implementation='pallas'.
NEIGHBORHOOD_OP = Op("neighborhood_attention")
NEIGHBORHOOD_OP.register("xla", _xla_backend, config_type=NeighborhoodXLA)
NEIGHBORHOOD_OP.register("pallas", _pallas_backend,
                         config_type=NeighborhoodPallas)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------

def _with_additional_tokens(out, lse, query, additional_keys,
                            additional_values, scale):
  """Merges the neighbourhood attention (out, lse) with plain attention of
  the same queries over the extra tokens, through the log-sum-exps (the one
  merge rule, `attnjax.softmax.merge_attentions`)."""
  extra_out, extra_lse = dot_product_attention_with_lse(
      flatten_spatial(query), additional_keys, additional_values,
      scale=scale, lse_layout="BTN")
  extra_out = extra_out.reshape(out.shape)
  extra_lse = extra_lse.reshape(lse.shape)
  return merge_attentions([out, extra_out], [lse, extra_lse],
                          lse_layout="BTN")


def neighborhood_attention(query, key, value, kernel_size, *, stride=1,
                           dilation=1, is_causal=False,
                           scale: Optional[float] = None, rpb=None,
                           additional_keys=None, additional_values=None,
                           return_lse: bool = False, implementation=None):
  """Neighborhood attention with NATTEN semantics (see module docstring).

  Args:
    query: [B, *spatial, N, H] with 1, 2 or 3 spatial dims.
    key, value: [B, *spatial, K, H] / [B, *spatial, K, Hv]; N % K == 0 (GQA).
    kernel_size: int or per-axis tuple; kernel_size * dilation <= size.
    stride: int or per-axis tuple, 1 <= stride <= kernel_size (GNA).
    dilation: int or per-axis tuple.
    is_causal: bool or per-axis tuple.
    scale: logit scale, default 1/sqrt(H).
    rpb: optional relative position bias [N, 2K_1 - 1, ...] (NATTEN layout).
    additional_keys, additional_values: optional [B, M, K, H] / [B, M, K, Hv]
      tokens every query also attends to (merged through the log-sum-exp).
    return_lse: also return the log-sum-exp, float32 [B, *spatial, N].
    implementation: None / 'auto', 'xla', 'pallas', a `NeighborhoodXLA` /
      `NeighborhoodPallas` config, or a sequence of these (attnjax._dispatch).

  Returns:
    [B, *spatial, N, Hv] in query.dtype (and the lse when `return_lse`).
  """
  nd, n, _ = check_spatial_qkv(query, key, value)
  params = NeighborhoodParams.make(query.shape[1:1 + nd], kernel_size, stride,
                                   dilation, is_causal)
  _check_additional(query, key, additional_keys, additional_values)
  if rpb is not None:
    _check_rpb(rpb, n, params.kernel_size)
  scale = default_scale(scale, query.shape[-1])
  out, lse = NEIGHBORHOOD_OP(implementation, query, key, value, params,
                             scale, rpb)
  if additional_keys is not None:
    out, lse = _with_additional_tokens(out, lse, query, additional_keys,
                                       additional_values, scale)
  return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------
# Layer
# ----------------------------------------------------------------------------

class NeighborhoodAttention(HeadGated):
  """NAT / DiNAT / GNA neighborhood attention layer on channels-last maps.

  Parameters as NATTEN's NeighborhoodAttention{1,2,3}D: `qkv` Linear(dim,
  3 dim, bias=qkv_bias), `rpb` [num_heads, 2K-1 per axis] when `use_rpb`
  (zero-initialized here; NAT uses trunc_normal(0.02)), `proj`
  Linear(dim, dim). Input [B, *spatial, dim] with `len(kernel_size)` spatial
  dims (an int kernel_size means 2D). `stride` as in
  `neighborhood_attention`. `implementation` as there ('pallas' needs
  use_rpb=False). `__call__(x, context=None)`: `context` [B, M, dim] tokens
  are projected with the key/value part of `qkv` and attended to by every
  query besides its neighbourhood (NATTEN's additional keys/values).

  Inputs smaller than kernel_size * dilation on an axis: NAT zero-pads the
  map (and attends to the padding); here the dilation is reduced to
  max(1, size // kernel) and, if still too small, the kernel to the size
  (the central part of the rpb table is used; stride is capped at the
  kernel), which equals attention over all valid positions of that axis.
  `window_for(spatial)` gives the window arguments a call uses.
  """

  def __init__(self, dim: int, num_heads: int, kernel_size=7, *, stride=1,
               dilation=1, is_causal=False, qkv_bias: bool = True,
               use_rpb: bool = True, qk_scale: Optional[float] = None,
               spatial_dims: Optional[int] = None, implementation=None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    if spatial_dims is None:
      spatial_dims = 2 if isinstance(kernel_size, int) else len(kernel_size)
    self.spatial_dims = spatial_dims
    self.implementation = implementation
    self.kernel_size = to_tuple("kernel_size", kernel_size, spatial_dims)
    self.stride = to_tuple("stride", stride, spatial_dims)
    self.dilation = to_tuple("dilation", dilation, spatial_dims)
    self.is_causal = to_bool_tuple("is_causal", is_causal, spatial_dims)
    for a, (k, s) in enumerate(zip(self.kernel_size, self.stride)):
      if s > k:
        raise ValueError(
            f"`stride` must be <= `kernel_size` on every axis; axis {a}: "
            f"stride={s}, kernel_size={k}.")
    self.num_heads = num_heads
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

  def window_for(self, spatial) -> Tuple[tuple, tuple, tuple, tuple]:
    """(kernel_size, stride, dilation, rpb index) used on a map of `spatial`
    size (the small-input rule above; rpb index: the slices of the table)."""
    ks, st, dl, sl = [], [], [], []
    for l, k, s, d in zip(spatial, self.kernel_size, self.stride,
                          self.dilation):
      kf = k
      if k * d > l:
        d = max(1, l // k)
        k = min(k, l)
      ks.append(k)
      st.append(min(s, k))
      dl.append(d)
      sl.append(slice(kf - k, kf + k - 1))
    return tuple(ks), tuple(st), tuple(dl), (slice(None),) + tuple(sl)

  def __call__(self, x, context=None):
    nd = self.spatial_dims
    check_channels_last(x, self.qkv.in_features, nd)
    ks, st, dl, rpb_index = self.window_for(x.shape[1:1 + nd])
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    rpb = None if self.rpb is None else self.rpb[...][rpb_index]
    extra = {}
    if context is not None:
      dim = self.qkv.in_features
      if (context.ndim != 3 or context.shape[0] != x.shape[0]
          or context.shape[-1] != dim):
        raise ValueError(
            f"`context` must be [batch, tokens, dim={dim}] with the batch of "
            f"`x` {tuple(x.shape)}, got {tuple(context.shape)}.")
      ckv = self.qkv(context).reshape(*context.shape[:-1], 3, self.num_heads,
                                      self.head_dim)
      extra = dict(additional_keys=ckv[..., 1, :, :],
                   additional_values=ckv[..., 2, :, :])
    out = neighborhood_attention(q, k, v, ks, stride=st, dilation=dl,
                                 is_causal=self.is_causal, scale=self.scale,
                                 rpb=rpb, implementation=self.implementation,
                                 **extra)
    return self.proj(self.gate_heads(out).reshape(x.shape))
