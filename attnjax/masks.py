"""Boolean attention masks (True = attend), broadcastable to [B, N, T, S].

Every constructor returns a boolean array; combine them with `and_masks` /
`or_masks`. Position conventions match `jax.nn.dot_product_attention`:
query position i and key position j are compared directly (top-left
alignment); pass `offset=kv_len - q_len` for the bottom-right alignment used
when the queries are the last positions of the key sequence (decoding).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._checks import check_int, normalize_window

Window = Union[int, Tuple[int, int]]


def _positions(q_len: int, kv_len: int, offset: int):
  q_len = check_int("q_len", q_len, min_value=0)
  kv_len = check_int("kv_len", kv_len, min_value=0)
  offset = check_int("offset", offset)
  qi = jnp.arange(q_len, dtype=jnp.int32)[:, None] + offset
  kj = jnp.arange(kv_len, dtype=jnp.int32)[None, :]
  return qi, kj


def causal_mask(q_len: int, kv_len: Optional[int] = None, *,
                offset: int = 0) -> jnp.ndarray:
  """[q_len, kv_len] mask: query i sees key j iff j <= i + offset."""
  kv_len = q_len if kv_len is None else kv_len
  qi, kj = _positions(q_len, kv_len, offset)
  return kj <= qi


def local_window_mask(q_len: int, kv_len: Optional[int], window: Window, *,
                      offset: int = 0) -> jnp.ndarray:
  """[q_len, kv_len] mask: i + offset - left <= j <= i + offset + right.

  `window` is an int w (meaning (w, w)) or a (left, right) pair, as
  `local_window_size` of `jax.nn.dot_product_attention`.
  """
  kv_len = q_len if kv_len is None else kv_len
  left, right = normalize_window(window)
  qi, kj = _positions(q_len, kv_len, offset)
  # Reaches beyond every position difference are unbounded in effect; cap
  # them so huge windows (2**31 = "all") stay inside int32.
  cap = int(q_len) + int(kv_len) + abs(int(offset))
  left, right = min(left, cap), min(right, cap)
  return (kj >= qi - left) & (kj <= qi + right)


def _check_lengths(name, x):
  """None, or an integer array of shape [batch]; concrete values must be
  >= 0. Fractional (float) lengths raise instead of being truncated."""
  if x is None:
    return None
  x = jnp.asarray(x)
  if x.ndim != 1:
    raise ValueError(f"`{name}` must have shape [batch], got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(
        f"`{name}` must be an integer array, got dtype {x.dtype}.")
  if not isinstance(x, jax.core.Tracer) and x.size and int(jnp.min(x)) < 0:
    raise ValueError(f"`{name}` must be >= 0, got {np.asarray(x)}.")
  return x


def padding_mask(q_len: int, kv_len: int, *,
                 q_lengths=None, kv_lengths=None) -> jnp.ndarray:
  """[B, 1, T, S] mask of valid (non-padded) query/key positions.

  `q_lengths` / `kv_lengths` are int arrays of shape [B]: positions at or past
  the length are padding. Either may be None (no padding on that side).
  """
  if q_lengths is None and kv_lengths is None:
    raise ValueError("padding_mask needs `q_lengths` and/or `kv_lengths`.")
  q_len = check_int("q_len", q_len, min_value=0)
  kv_len = check_int("kv_len", kv_len, min_value=0)
  q_lengths = _check_lengths("q_lengths", q_lengths)
  kv_lengths = _check_lengths("kv_lengths", kv_lengths)
  m = jnp.ones((1, 1, q_len, kv_len), dtype=bool)
  if q_lengths is not None:
    q_valid = jnp.arange(q_len)[None, :] < jnp.asarray(q_lengths)[:, None]
    m = m & q_valid[:, None, :, None]
  if kv_lengths is not None:
    kv_valid = jnp.arange(kv_len)[None, :] < jnp.asarray(kv_lengths)[:, None]
    m = m & kv_valid[:, None, None, :]
  return m


def segment_mask(q_segment_ids, kv_segment_ids=None) -> jnp.ndarray:
  """[B, 1, T, S] mask: attend only within the same segment id.

  Segment ids are int arrays [B, T] / [B, S] (packed sequences).
  """
  kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
  if jnp.ndim(q_segment_ids) != 2 or jnp.ndim(kv_segment_ids) != 2:
    raise ValueError(
        "`q_segment_ids` and `kv_segment_ids` must have shape [batch, len], got "
        f"{jnp.shape(q_segment_ids)} and {jnp.shape(kv_segment_ids)}.")
  if jnp.shape(q_segment_ids)[0] != jnp.shape(kv_segment_ids)[0]:
    raise ValueError(
        "`q_segment_ids` and `kv_segment_ids` batch sizes differ: "
        f"{jnp.shape(q_segment_ids)} vs {jnp.shape(kv_segment_ids)}.")
  q = jnp.asarray(q_segment_ids)[:, None, :, None]
  k = jnp.asarray(kv_segment_ids)[:, None, None, :]
  return q == k


def block_mask(layout, block_q: int, block_k: int, q_len: Optional[int] = None,
               kv_len: Optional[int] = None) -> jnp.ndarray:
  """Expands a block layout [..., nq_blocks, nk_blocks] to [..., T, S].

  Block (a, b) True means queries [a*block_q, (a+1)*block_q) may attend keys
  [b*block_k, (b+1)*block_k). The result is cropped to (q_len, kv_len), which
  default to the full block extent (so ragged tails are allowed).
  """
  layout = jnp.asarray(layout, dtype=bool)
  if layout.ndim < 2:
    raise ValueError(
        f"`layout` must have shape [..., nq_blocks, nk_blocks], got {layout.shape}.")
  block_q = check_int("block_q", block_q, min_value=1)
  block_k = check_int("block_k", block_k, min_value=1)
  q_len = check_int("q_len", q_len, min_value=0, allow_none=True)
  kv_len = check_int("kv_len", kv_len, min_value=0, allow_none=True)
  nqb, nkb = layout.shape[-2:]
  q_len = nqb * block_q if q_len is None else q_len
  kv_len = nkb * block_k if kv_len is None else kv_len
  if q_len > nqb * block_q or kv_len > nkb * block_k:
    raise ValueError(
        f"`layout` {layout.shape} with blocks ({block_q}, {block_k}) covers "
        f"({nqb * block_q}, {nkb * block_k}) positions, fewer than "
        f"(q_len, kv_len)=({q_len}, {kv_len}).")
  m = jnp.repeat(jnp.repeat(layout, block_q, axis=-2), block_k, axis=-1)
  return m[..., :q_len, :kv_len]


def _combine(op, masks):
  masks = [jnp.asarray(m, dtype=bool) for m in masks if m is not None]
  if not masks:
    return None
  # Left-pad ranks explicitly (numpy broadcasting, right-aligned), so this
  # also works under jax_numpy_rank_promotion='raise'.
  rank = max(m.ndim for m in masks)
  out = None
  for m in masks:
    m = m.reshape((1,) * (rank - m.ndim) + m.shape)
    out = m if out is None else op(out, m)
  return out


def and_masks(*masks) -> Optional[jnp.ndarray]:
  """Logical AND of masks (None entries are ignored), with broadcasting."""
  return _combine(jnp.logical_and, masks)


def or_masks(*masks) -> Optional[jnp.ndarray]:
  """Logical OR of masks (None entries are ignored), with broadcasting."""
  return _combine(jnp.logical_or, masks)


def as_4d(mask) -> Optional[jnp.ndarray]:
  """Left-pads a mask/bias with unit dims to rank 4 ([B, N, T, S])."""
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.ndim > 4:
    raise ValueError(f"mask/bias must have rank <= 4, got shape {mask.shape}.")
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def mask_to_bias(mask, dtype=jnp.float32) -> jnp.ndarray:
  """Additive bias: 0 where attended, a large finite negative elsewhere."""
  mask = jnp.asarray(mask, dtype=bool)
  return jnp.where(mask, 0.0, jnp.finfo(dtype).min / 2).astype(dtype)


__all__ = [
    "causal_mask", "local_window_mask", "padding_mask", "segment_mask",
    "block_mask", "and_masks", "or_masks", "as_4d", "mask_to_bias",
]

