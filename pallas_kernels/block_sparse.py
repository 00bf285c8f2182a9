"""Block-sparse flash attention: the flash kernels driven by a tile layout.

`block_layout[b, l, i, j]` (bool, [B|1, N|1, ceil(T/block_q),
ceil(S/block_kv)]; leading dims may be omitted) says whether query tile i
may attend to key tile j (for example b and head l; a dim of 1 is shared). The layout is compressed into per-tile index tables
(which key tiles each query tile visits, and for the backward, which query
tiles each key tile visits), so empty tiles are skipped: never loaded, never
multiplied. Element-level masks (causal, window, segment ids, bool mask,
ragged tails) still apply inside visited tiles, which is how a causal
diagonal tile is handled.

This is the engine for sliding-window, block-causal and MoBA-style
(query tile -> top-k key tiles) patterns; the layout may be a traced array
(e.g. computed by a router), as the tables are built with jnp.

Cost is proportional to the number of visited tiles. The tables are read
inside the kernel as scalars (SMEM on TPU): see docs/kernels.md.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from pallas_kernels._util import cdiv, resolve_interpret, target_platform
from pallas_kernels.flash import (BlockSizes, check_inputs, flash_entry,
                                  mha_reference)


def _tables(layout):
  """bool [Bl, Nl, nq, nk] -> ((kv_cnt, kv_idx), (q_cnt, q_idx)) int32."""
  layout = jnp.asarray(layout, bool)

  def compress(x):   # along the last axis: visited indices first, ascending
    cnt = jnp.sum(x, axis=-1).astype(jnp.int32)
    idx = jnp.argsort(jnp.logical_not(x), axis=-1, stable=True)
    return cnt, idx.astype(jnp.int32)

  return compress(layout), compress(jnp.swapaxes(layout, -1, -2))


def _check_layout(block_layout, b, n, nq, nk, t, s, block_q, block_kv):
  """-> bool [B|1, N|1, nq, nk]."""
  lay = block_layout
  if not hasattr(lay, "shape"):
    lay = np.asarray(lay)
  lay = lay.reshape((1,) * max(0, 4 - lay.ndim) + tuple(lay.shape))
  if (lay.ndim != 4 or lay.shape[0] not in (1, b) or lay.shape[1] not in (1, n)
      or lay.shape[2:] != (nq, nk)):
    raise ValueError(
        f"`block_layout` must have shape (nq, nk), (heads|1, nq, nk) or "
        f"(batch|1, heads|1, nq, nk) = ({b}|1, {n}|1, {nq}, {nk}) for "
        f"q_len={t}, kv_len={s}, block_q={block_q}, block_kv={block_kv}; got "
        f"{tuple(block_layout.shape)}.")
  return jnp.asarray(lay, bool)


def _split_tiles(interpret) -> bool:
  return target_platform() == "gpu" and not resolve_interpret(interpret)


def _split_factor(tile: int, cap: int) -> int:
  """Power of two r with tile % r == 0 and tile // r <= cap (or as close as
  divisibility allows)."""
  r = 1
  while tile // r > cap and tile % (2 * r) == 0:
    r *= 2
  return r


def block_sparse_attention(query, key, value, block_layout, *, block_q: int,
                           block_kv: int, is_causal: bool = False,
                           scale: Optional[float] = None,
                           interpret: Optional[bool] = None, bias=None,
                           mask=None, local_window_size=None,
                           q_segment_ids=None, kv_segment_ids=None,
                           return_lse: bool = False,
                           heads_major: Optional[bool] = None):
  """Flash attention visiting only the tiles `block_layout` marks True.

  Args:
    query, key, value: [B, T, N, H], [B, S, K, H], [B, S, K, Hv].
    block_layout: bool [nq, nk], [N|1, nq, nk] or [B|1, N|1, nq, nk] (e.g.
      routed per example) with nq = ceil(T/block_q),
      nk = ceil(S/block_kv).
    block_q, block_kv: tile sizes of the layout (also the kernel tiles,
      except on GPU, where tiles too large for shared memory at this head
      dim and dtype are split into sub-tiles).
    Other arguments as `flash_attention`. Query rows whose tiles visit
    nothing (or whose keys are all masked) give zeros.
  """
  b, t, n, s, nkv, h, hv = check_inputs(query, key, value)
  for nm, x in (("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(x, int) or x <= 0:
      raise ValueError(f"`{nm}` must be a positive int, got {x!r}.")
  nq, nk = cdiv(t, block_q), cdiv(s, block_kv)
  layout = _check_layout(block_layout, b, n, nq, nk, t, s, block_q, block_kv)
  bq, bk = block_q, block_kv
  if _split_tiles(interpret):
    # Layout tiles larger than what fits a GPU block's shared memory are
    # split into sub-tiles (exact: a sub-tile is visited iff its parent is).
    cap = BlockSizes.get_default("gpu", max(h, hv), query.dtype)
    rq = _split_factor(bq, min(cap.block_q, cap.block_q_bwd))
    rk = _split_factor(bk, min(cap.block_kv, cap.block_kv_bwd))
    if rq > 1 or rk > 1:
      bq, bk = bq // rq, bk // rk
      layout = jnp.repeat(jnp.repeat(layout, rq, axis=2), rk, axis=3)
      layout = layout[:, :, :cdiv(t, bq), :cdiv(s, bk)]
  out, lse = flash_entry(
      query, key, value, bias=bias, mask=mask, is_causal=is_causal,
      scale=scale, local_window_size=local_window_size,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      block_sizes=None, interpret=interpret, heads_major=heads_major,
      tables=_tables(layout), tile_sizes=(bq, bk))
  return (out, lse) if return_lse else out


def layout_to_mask(block_layout, block_q: int, block_kv: int, q_len: int,
                   kv_len: int):
  """Expands a tile layout [..., nq, nk] to a bool mask [..., T, S] ([nq, nk]
  gives [1, T, S])."""
  lay = jnp.asarray(block_layout, bool)
  if lay.ndim == 2:
    lay = lay[None]
  m = jnp.repeat(jnp.repeat(lay, block_q, axis=-2), block_kv, axis=-1)
  return m[..., :q_len, :kv_len]


def block_sparse_attention_reference(query, key, value, block_layout, *,
                                     block_q: int, block_kv: int, bias=None,
                                     mask=None, return_lse: bool = False,
                                     **kwargs):
  """Dense plain-jnp attention with the layout expanded to an element mask."""
  t, s = query.shape[1], key.shape[1]
  lay_mask = layout_to_mask(block_layout, block_q, block_kv, t, s)
  if lay_mask.ndim == 3:           # [L, T, S] -> [1, L, T, S]
    lay_mask = lay_mask[None]
  mask = lay_mask if mask is None else jnp.logical_and(mask, lay_mask)
  return mha_reference(query, key, value, bias=bias, mask=mask,
                       return_lse=return_lse, **kwargs)


# --------------------------------------------------------------- layouts

def causal_block_layout(nq: int, nk: int, block_q: int, block_kv: int):
  """Tiles intersecting the causal triangle (top-left aligned): [nq, nk]."""
  i = np.arange(nq)[:, None]
  j = np.arange(nk)[None, :]
  return j * block_kv <= i * block_q + block_q - 1


def local_block_layout(nq: int, nk: int, block_q: int, block_kv: int,
                       left: int, right: int):
  """Tiles intersecting the band i - left <= j <= i + right: [nq, nk]."""
  i = np.arange(nq)[:, None]
  j = np.arange(nk)[None, :]
  lo_q, hi_q = i * block_q, i * block_q + block_q - 1
  lo_k, hi_k = j * block_kv, j * block_kv + block_kv - 1
  return (hi_k >= lo_q - left) & (lo_k <= hi_q + right)


def layout_from_mask(mask, block_q: int, block_kv: int):
  """bool [..., T, S] -> [..., nq, nk]: tile visited iff any entry is True."""
  mask = jnp.asarray(mask, bool)
  *lead, t, s = mask.shape
  nq, nk = cdiv(t, block_q), cdiv(s, block_kv)
  pad = [(0, 0)] * len(lead) + [(0, nq * block_q - t), (0, nk * block_kv - s)]
  m = jnp.pad(mask, pad)
  m = m.reshape(*lead, nq, block_q, nk, block_kv)
  return jnp.any(m, axis=(-3, -1))


def visited_fraction(block_layout) -> float:
  """Fraction of tiles a layout visits (the cost relative to dense)."""
  lay = np.asarray(block_layout, bool)
  return float(lay.mean())
