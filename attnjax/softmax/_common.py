"""Argument handling shared by every softmax-attention backend.

`prepare` validates user input once and returns an `AttentionCall`: rank-4
arrays plus normalized static config. Backends take an `AttentionCall` and
return `(out, lse)` with out `[B, T, N, Hv]` in the query dtype and lse
`[B, N, T]` float32 (-inf on rows with nothing to attend to).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from attnjax import masks as masks_lib
from attnjax._checks import (check_broadcastable, check_ids, check_qkv,
                             normalize_window)

# Segment id given to padded / beyond-length positions: never equal between a
# query and a key, so those pairs are masked.
Q_PAD_SEGMENT = -(2**31)
KV_PAD_SEGMENT = -(2**31) + 1


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  query: jax.Array           # [B, T, N, H]
  key: jax.Array             # [B, S, K, H]
  value: jax.Array           # [B, S, K, Hv]
  bias: Optional[jax.Array]  # rank 4, broadcastable to [B, N, T, S]
  mask: Optional[jax.Array]  # rank 4 bool, broadcastable to [B, N, T, S]
  q_segment_ids: Optional[jax.Array]   # [B, T] int32 (lengths folded in)
  kv_segment_ids: Optional[jax.Array]  # [B, S] int32 (lengths folded in)
  scale: float
  is_causal: bool
  window: Optional[Tuple[int, int]]    # (left, right) or None
  dropout_rate: float
  dropout_rng: Any
  has_seq_lengths: bool      # lengths were given (needed by cudnn delegate)
  query_seq_lengths: Optional[jax.Array]
  key_value_seq_lengths: Optional[jax.Array]
  raw_segment_ids: bool      # user passed segment ids explicitly

  @property
  def shape(self):
    b, t, n, h = self.query.shape
    s, k = self.key.shape[1], self.key.shape[2]
    return b, t, n, s, k, h, self.value.shape[-1]

  def effective_window(self) -> Optional[Tuple[float, float]]:
    """(left, right) reach of each query, combining causal and window.

    Query i may see keys in [i - left, i + right]; inf means unbounded.
    None when neither causal nor window restricts positions.
    """
    if not self.is_causal and self.window is None:
      return None
    left, right = (math.inf, math.inf) if self.window is None else self.window
    if self.is_causal:
      right = min(right, 0)
    return left, right

  def dense_mask(self) -> Optional[jax.Array]:
    """All masking folded into one boolean [B|1, N|1, T, S] array (or None)."""
    b, t, n, s, _, _, _ = self.shape
    parts = [self.mask]
    if self.is_causal:
      parts.append(masks_lib.causal_mask(t, s))
    if self.window is not None:
      parts.append(masks_lib.local_window_mask(t, s, self.window))
    if self.q_segment_ids is not None:
      parts.append(masks_lib.segment_mask(self.q_segment_ids,
                                          self.kv_segment_ids))
    m = masks_lib.and_masks(*parts)
    return masks_lib.as_4d(m)


def prepare(query, key, value, bias=None, mask=None, *, scale=None,
            is_causal=False, local_window_size=None, query_seq_lengths=None,
            key_value_seq_lengths=None, q_segment_ids=None,
            kv_segment_ids=None, dropout_rate=0.0, dropout_rng=None):
  """Validates inputs; returns (AttentionCall, unbatched: bool)."""
  b, t, n, s, k, h, hv = check_qkv(query, key, value)
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  target = (b, n, t, s)
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"`bias` must be floating point, got dtype {bias.dtype}.")
    if bias.ndim > 4:
      raise ValueError(f"`bias` must have rank <= 4, got shape {bias.shape}.")
    check_broadcastable("bias", bias, target)
    bias = masks_lib.as_4d(bias)
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(
          f"`mask` must be boolean (True = attend), got dtype {mask.dtype}.")
    if mask.ndim > 4:
      raise ValueError(f"`mask` must have rank <= 4, got shape {mask.shape}.")
    check_broadcastable("mask", mask, target)
    mask = masks_lib.as_4d(mask)
  window = normalize_window(local_window_size)
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  if not (0.0 <= float(dropout_rate) < 1.0):
    raise ValueError(f"`dropout_rate` must be in [0, 1), got {dropout_rate}.")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("`dropout_rng` is required when `dropout_rate` > 0.")

  def _check_ids(name, ids, length):
    ids = jnp.asarray(ids)
    if unbatched and ids.ndim == 1:
      ids = ids[None]
    return check_ids(name, ids, b, length)

  def _check_lengths(name, lengths):
    lengths = jnp.asarray(lengths)
    if unbatched and lengths.ndim == 0:
      lengths = lengths[None]
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(
          f"`{name}` must be an int array of shape {(b,)}, got "
          f"{lengths.shape} ({lengths.dtype}).")
    return lengths.astype(jnp.int32)

  raw_segments = q_segment_ids is not None or kv_segment_ids is not None
  if raw_segments:
    if q_segment_ids is None or kv_segment_ids is None:
      # Self-attention convenience: one given, reuse it if lengths agree.
      if t != s:
        raise ValueError(
            "give both `q_segment_ids` and `kv_segment_ids` when q_len != "
            f"kv_len ({t} != {s}).")
      q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
      kv_segment_ids = q_segment_ids
    q_segment_ids = _check_ids("q_segment_ids", q_segment_ids, t)
    kv_segment_ids = _check_ids("kv_segment_ids", kv_segment_ids, s)
  if query_seq_lengths is not None:
    query_seq_lengths = _check_lengths("query_seq_lengths", query_seq_lengths)
  if key_value_seq_lengths is not None:
    key_value_seq_lengths = _check_lengths("key_value_seq_lengths",
                                           key_value_seq_lengths)
  has_lengths = query_seq_lengths is not None or key_value_seq_lengths is not None
  if has_lengths:
    # Fold lengths into segment ids: positions past the length get a sentinel
    # id that matches nothing on the other side.
    if q_segment_ids is None:
      q_segment_ids = jnp.zeros((b, t), jnp.int32)
      kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    if query_seq_lengths is not None:
      valid = jnp.arange(t)[None, :] < query_seq_lengths[:, None]
      q_segment_ids = jnp.where(valid, q_segment_ids, Q_PAD_SEGMENT)
    if key_value_seq_lengths is not None:
      valid = jnp.arange(s)[None, :] < key_value_seq_lengths[:, None]
      kv_segment_ids = jnp.where(valid, kv_segment_ids, KV_PAD_SEGMENT)
  call = AttentionCall(
      query=query, key=key, value=value, bias=bias, mask=mask,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      scale=float(scale), is_causal=bool(is_causal), window=window,
      dropout_rate=float(dropout_rate), dropout_rng=dropout_rng,
      has_seq_lengths=has_lengths, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      raw_segment_ids=raw_segments)
  return call, unbatched


def masked_softmax_stats(logits, mask):
  """Row max (finite-safe) and masked exponentials, float32.

  Returns (p_unnormalized, l, lse) with masked entries exactly 0 and, for rows
  with nothing to attend to, l = 0 and lse = -inf.
  """
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  return p, l, lse[..., 0]
