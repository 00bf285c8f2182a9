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
from attnjax._checks import (as_array, check_broadcastable, check_ids,
                             check_qkv, check_rate, check_scale,
                             normalize_window)

# Segment id given to padded / beyond-length positions: never equal between a
# query and a key, so those pairs are masked.
Q_PAD_SEGMENT = -(2**31)
KV_PAD_SEGMENT = -(2**31) + 1
# Finite stand-in for -inf on masked logits (so jax.debug_infs holds); masked
# probabilities are then zeroed with jnp.where, never by this value alone.
MASK_VALUE = -1e30


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
  """Validates inputs; returns (AttentionCall, unbatched: bool).

  Key/value slots that no query can attend to (see `kv_live`) are zeroed
  with jnp.where, so whatever they hold (NaN, Inf, garbage from a padded
  cache) never reaches an output or a gradient, in every backend.
  """
  query = as_array("query", query)
  key = as_array("key", key)
  value = as_array("value", value)
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
  if window is not None:
    # A reach beyond t + s is unbounded in effect; capping it keeps every
    # position computation inside int32 (a window of 2**31 means "all").
    window = (min(window[0], t + s), min(window[1], t + s))
  scale = check_scale("scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(h) if h else 1.0
  dropout_rate = check_rate("dropout_rate", dropout_rate)
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
  live = kv_live(mask, q_segment_ids, kv_segment_ids, query_seq_lengths,
                 is_causal, window, b, t, n, s, k)
  if live is not None:
    key = jnp.where(live, key, jnp.zeros((), key.dtype))
    value = jnp.where(live, value, jnp.zeros((), value.dtype))
  call = AttentionCall(
      query=query, key=key, value=value, bias=bias, mask=mask,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      scale=float(scale), is_causal=bool(is_causal), window=window,
      dropout_rate=float(dropout_rate), dropout_rng=dropout_rng,
      has_seq_lengths=has_lengths, query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      raw_segment_ids=raw_segments)
  return call, unbatched


def empty_result(call: AttentionCall, need_lse: bool = True):
  """(out, lse) of a call with a zero-size dim: zeros [B, T, N, Hv] in the
  query dtype, lse [B, N, T] -inf (nothing to attend to), or None."""
  b, t, n, s, k, h, hv = call.shape
  out = jnp.zeros((b, t, n, hv), call.query.dtype)
  lse = jnp.full((b, n, t), -jnp.inf, jnp.float32) if need_lse else None
  return out, lse


def _segment_live(q_seg, kv_seg):
  """[B, S] bool: kv_seg[b, j] occurs among q_seg[b, :] (sort + search,
  O((T + S) log T), no [T, S] array)."""
  def one(q, kv):
    qs = jnp.sort(q)
    idx = jnp.clip(jnp.searchsorted(qs, kv), 0, qs.shape[0] - 1)
    return qs[idx] == kv
  return jax.vmap(one)(q_seg, kv_seg)


def kv_live(mask, q_segment_ids, kv_segment_ids, query_seq_lengths,
            is_causal, window, b, t, n, s, k):
  """Bool [B|1, S, K|1, 1]: False where no query can attend the key slot.

  The AND of what each masking component alone rules out for every query:
  a boolean-mask column that is False for all queries (of all heads sharing
  the kv head), a kv segment id no query carries (this covers the padding
  past `key_value_seq_lengths`), keys to the right of every query's causal /
  window reach (using `query_seq_lengths` when given). None when nothing can
  be ruled out. Slots that some query sees are not covered (their value
  legitimately reaches that query; a matmul cannot keep a NaN there out of
  the other queries' rows).
  """
  parts = []
  if t == 0:
    return None
  if mask is not None and mask.shape[3] != 1:
    mb, mn = mask.shape[0], mask.shape[1]
    col = jnp.any(mask, axis=2)                      # [Bm, Nm, S]
    if mn != 1 and n != k:
      col = jnp.any(col.reshape(mb, k, n // k, s), axis=2)   # [Bm, K, S]
    parts.append(jnp.swapaxes(col, 1, 2)[..., None])  # [Bm, S, Km, 1]
  if q_segment_ids is not None:
    parts.append(_segment_live(q_segment_ids, kv_segment_ids)[:, :, None, None])
  right = math.inf if window is None else window[1]
  if is_causal:
    right = min(right, 0)
  if math.isfinite(right):
    j = jnp.arange(s, dtype=jnp.int32)
    if query_seq_lengths is not None:
      last = jnp.clip(query_seq_lengths, 0, t) - 1      # last valid query
      parts.append((j[None, :] <= last[:, None] + int(right))[:, :, None, None])
    elif t - 1 + right < s - 1:
      parts.append((j <= t - 1 + int(right)).reshape(1, s, 1, 1))
  if not parts:
    return None
  out = parts[0]
  for p in parts[1:]:
    out = jnp.logical_and(out, p)
  return out


def input_live(b: int, t: int, s: int, *, mask=None, is_causal=False,
               local_window_size=None, query_seq_lengths=None,
               key_value_seq_lengths=None, q_segment_ids=None,
               kv_segment_ids=None):
  """Bool [B|1, S] of key positions some query may attend (None: all).

  For layers that project key/value inputs: zeroing the inputs at the other
  positions keeps whatever they hold out of the parameter gradients too.
  Same rules as `kv_live`, with the heads of a mask OR-ed together.
  """
  if t == 0 or s == 0:
    return None
  if mask is not None:
    mask = masks_lib.as_4d(jnp.asarray(mask, bool))
    mask = jnp.any(mask, axis=1, keepdims=True)
  window = normalize_window(local_window_size)
  if window is not None:
    window = (min(window[0], t + s), min(window[1], t + s))
  if q_segment_ids is not None or kv_segment_ids is not None:
    q_segment_ids = kv_segment_ids if q_segment_ids is None else q_segment_ids
    kv_segment_ids = q_segment_ids if kv_segment_ids is None else kv_segment_ids
    q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
    kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
  qlen = None
  if query_seq_lengths is not None or key_value_seq_lengths is not None:
    if q_segment_ids is None:
      q_segment_ids = jnp.zeros((b, t), jnp.int32)
      kv_segment_ids = jnp.zeros((b, s), jnp.int32)
    if query_seq_lengths is not None:
      qlen = jnp.asarray(query_seq_lengths, jnp.int32).reshape(b)
      q_segment_ids = jnp.where(jnp.arange(t)[None, :] < qlen[:, None],
                                q_segment_ids, Q_PAD_SEGMENT)
    if key_value_seq_lengths is not None:
      kvl = jnp.asarray(key_value_seq_lengths, jnp.int32).reshape(b)
      kv_segment_ids = jnp.where(jnp.arange(s)[None, :] < kvl[:, None],
                                 kv_segment_ids, KV_PAD_SEGMENT)
  live = kv_live(mask, q_segment_ids, kv_segment_ids, qlen, bool(is_causal),
                 window, b, t, 1, s, 1)
  return None if live is None else live[:, :, 0, 0]


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
