"""Sliding-window and block-sparse softmax attention with linear cost.

`sliding_window_attention`: query i sees keys in [i - left, i + right]
(`window_size` int w = (w, w); causal forces right = 0). Only the key blocks
that intersect each query block's band are gathered, so cost is
O(T (block + left + right) H) rather than O(T S H).

`block_sparse_attention`: an explicit block layout [nq_blocks, nk_blocks]
(or [B|1, N|1, nq_blocks, nk_blocks]), True = query block may attend key
block; each query block gathers only its True key blocks (at most
`max_blocks_per_row`, by default the densest row of a concrete layout).

References: `attnjax.dot_product_attention` with the equivalent dense mask.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax._checks import check_implementation, normalize_window
from attnjax.sequence import _common
from attnjax.sequence._gather import gathered_attention
from attnjax.softmax import dot_product_attention

SUPPORT_SLIDING_WINDOW = {
    "noncausal_self": True, "causal_self": True,
    "noncausal_cross": True, "causal_cross": True,
}
SUPPORT_BLOCK_SPARSE = dict(SUPPORT_SLIDING_WINDOW)

DEFAULT_BLOCK = 64


def _common_checks(query, key, value, mask, bias, dropout_rate, mechanism):
  _common.reject("bias", bias, mechanism, "only key blocks are gathered; a "
                 "dense [T, S] bias would defeat the sparsity.")
  _common.reject("dropout_rate", dropout_rate, mechanism,
                 "attention dropout is not implemented for gathered blocks.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s, mechanism=mechanism,
                                     unbatched=unbatched)
  # Masked slots are zeroed by a select, so NaN/Inf there reaches nothing.
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  return query, key, value, dims, unbatched, kv_mask


def sliding_window_attention(query, key, value, window_size, *,
                             is_causal: bool = False,
                             scale: Optional[float] = None,
                             block_size: Optional[int] = None, mask=None,
                             bias=None, dropout_rate: float = 0.0,
                             dropout_rng=None,
                             implementation: Optional[str] = None):
  """Local softmax attention over a band of keys, linear in sequence length.

  Args:
    query: [B, T, N, H] (or [T, N, H]); key: [B, S, K, H]; value [B, S, K, Hv].
    window_size: int w or (left, right): query i sees keys i-left..i+right
      (top-left aligned positions, as `jax.nn.dot_product_attention`).
    is_causal: additionally j <= i.
    scale: default 1/sqrt(H).
    block_size: query/key block length (default min(64, left + right + 1)).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla' (gathered key blocks, below) or 'pallas'
      (`pallas_kernels.flash_attention` with the window: key tiles outside
      the band are never visited; `block_size` is then its tile size).

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no key in reach are zeros.
  """
  del dropout_rng
  impl = check_implementation(implementation, "sliding_window_attention")
  query, key, value, dims, unbatched, kv_mask = _common_checks(
      query, key, value, mask, bias, dropout_rate, "sliding_window_attention")
  b, t, n, s, k, h, hv = dims
  if window_size is None:
    raise ValueError("`window_size` must be an int or (left, right), got None.")
  left, right = normalize_window(window_size)
  if is_causal:
    right = 0
  if impl == "pallas":
    from pallas_kernels import flash as pallas_flash
    sizes = None
    if block_size is not None:
      bs = _common.check_positive_int("block_size", block_size)
      sizes = pallas_flash.BlockSizes(bs, bs, bs, bs)
    out = pallas_flash.flash_attention(
        query, key, value, local_window_size=(left, right),
        scale=_common.default_scale(scale, h), block_sizes=sizes,
        mask=None if kv_mask is None else kv_mask[:, None, None, :])
    return out[0] if unbatched else out
  bs = (max(1, min(DEFAULT_BLOCK, left + right + 1)) if block_size is None
        else block_size)
  bs = _common.check_positive_int("block_size", bs)
  nqb, nkb = -(-t // bs), -(-s // bs)
  # Key blocks touching [a*bs - left, a*bs + bs - 1 + right].
  top = min(nkb, (bs - 1 + left + right) // bs + 2)
  # Shifting the start into [0, nkb - top] keeps the band covered (it spans
  # at most `top` in-range blocks) and the indices distinct.
  first = jnp.clip((jnp.arange(nqb) * bs - left) // bs, 0, nkb - top)
  idx = first[:, None] + jnp.arange(top)[None, :]
  valid = jnp.ones(idx.shape, bool)
  out = gathered_attention(
      query, key, value, idx[None, None], valid[None, None], block_q=bs,
      block_k=bs, scale=_common.default_scale(scale, h), is_causal=is_causal,
      window=(left, right), kv_mask=kv_mask)
  return out[0] if unbatched else out


def sliding_window_attention_reference(query, key, value, window_size, *,
                                       is_causal: bool = False,
                                       scale: Optional[float] = None,
                                       mask=None):
  """Dense softmax attention with the band mask (plain XLA backend)."""
  return dot_product_attention(query, key, value, mask=mask, scale=scale,
                               is_causal=is_causal,
                               local_window_size=window_size,
                               implementation="xla")


def _layout_4d(layout, b, n, nqb, nkb):
  layout = jnp.asarray(layout)
  if layout.dtype != jnp.bool_:
    raise ValueError(f"`layout` must be boolean, got dtype {layout.dtype}.")
  if layout.ndim not in (2, 4) or layout.shape[-2:] != (nqb, nkb):
    raise ValueError(
        f"`layout` must have shape [{nqb}, {nkb}] or [B|1, N|1, {nqb}, {nkb}] "
        f"(query/key blocks), got {layout.shape}.")
  if layout.ndim == 4 and (layout.shape[0] not in (1, b) or
                           layout.shape[1] not in (1, n)):
    raise ValueError(
        f"`layout` leading dims must be 1 or (batch={b}, heads={n}), got "
        f"{layout.shape}.")
  return layout.reshape((1,) * (4 - layout.ndim) + layout.shape)


def _block_sizes(block_size):
  if isinstance(block_size, (int, np.integer)):
    bs = _common.check_positive_int("block_size", block_size)
    return bs, bs
  try:
    bq, bk = block_size
  except (TypeError, ValueError):
    raise ValueError(
        f"`block_size` must be an int or (block_q, block_k), got {block_size!r}."
    ) from None
  return (_common.check_positive_int("block_size", bq),
          _common.check_positive_int("block_size", bk))


def block_sparse_attention(query, key, value, layout, block_size, *,
                           is_causal: bool = False,
                           scale: Optional[float] = None,
                           max_blocks_per_row: Optional[int] = None, mask=None,
                           bias=None, dropout_rate: float = 0.0,
                           dropout_rng=None,
                           implementation: Optional[str] = None):
  """Softmax attention restricted to the True blocks of `layout`.

  Args:
    query, key, value: as `dot_product_attention`.
    layout: bool [nq_blocks, nk_blocks] or [B|1, N|1, nq_blocks, nk_blocks]
      with nq_blocks = ceil(T / block_q), nk_blocks = ceil(S / block_k).
    block_size: int or (block_q, block_k).
    is_causal: additionally j <= i inside the chosen blocks.
    max_blocks_per_row: static bound on True blocks per row; required when
      `layout` is traced (under jit; a row with more True blocks then keeps
      only its first `max_blocks_per_row`), else the densest row of the
      layout; a concrete layout with a denser row raises ValueError.
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla' (gathered key blocks, below) or 'pallas'
      (`pallas_kernels.block_sparse_attention`: the flash kernels loop over
      each tile's True blocks only; `max_blocks_per_row` is not needed).

  Returns:
    [B, T, N, Hv] in query.dtype; rows with nothing to attend to are zeros.
  """
  del dropout_rng
  impl = check_implementation(implementation, "block_sparse_attention")
  query, key, value, dims, unbatched, kv_mask = _common_checks(
      query, key, value, mask, bias, dropout_rate, "block_sparse_attention")
  b, t, n, s, k, h, hv = dims
  bq, bk = _block_sizes(block_size)
  nqb, nkb = -(-t // bq), -(-s // bk)
  raw_layout = layout
  layout = _layout_4d(layout, b, n, nqb, nkb)
  if impl == "pallas":
    from pallas_kernels import block_sparse as pallas_bs
    out = pallas_bs.block_sparse_attention(
        query, key, value, layout, block_q=bq, block_kv=bk,
        is_causal=is_causal, scale=_common.default_scale(scale, h),
        mask=None if kv_mask is None else kv_mask[:, None, None, :])
    return out[0] if unbatched else out
  traced = isinstance(raw_layout, jax.core.Tracer)
  densest = None if traced else int(np.max(np.sum(np.asarray(raw_layout), -1),
                                           initial=0))
  if max_blocks_per_row is None:
    if traced:
      raise ValueError(
          "`max_blocks_per_row` is required when `layout` is traced (jit).")
    max_blocks_per_row = max(1, densest)
  top = min(nkb, _common.check_positive_int("max_blocks_per_row",
                                            max_blocks_per_row))
  if densest is not None and densest > top:
    # Gathering only `top` blocks would silently drop the rest.
    raise ValueError(
        f"`layout` has a row with {densest} True blocks but "
        f"`max_blocks_per_row` is {max_blocks_per_row}; pass at least "
        f"{densest} (or None to size it from the layout).")
  # True blocks first, in increasing block order.
  prio = (jnp.where(layout, 2 * nkb, 0) -
          jnp.arange(nkb).reshape(1, 1, 1, nkb))
  _, idx = jax.lax.top_k(prio, top)
  valid = jnp.take_along_axis(layout, idx, axis=-1)
  out = gathered_attention(
      query, key, value, idx, valid, block_q=bq, block_k=bk,
      scale=_common.default_scale(scale, h), is_causal=is_causal,
      kv_mask=kv_mask)
  return out[0] if unbatched else out


def block_sparse_attention_reference(query, key, value, layout, block_size, *,
                                     is_causal: bool = False,
                                     scale: Optional[float] = None, mask=None):
  """Dense softmax attention with `masks.block_mask(layout)`."""
  bq, bk = _block_sizes(block_size)
  t, s = query.shape[-3], key.shape[-3]
  dense = masks_lib.block_mask(layout, bq, bk, t, s)
  return dot_product_attention(query, key, value,
                               mask=masks_lib.and_masks(dense, mask),
                               scale=scale, is_causal=is_causal,
                               implementation="xla")
