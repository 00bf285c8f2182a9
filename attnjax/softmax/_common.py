"""Argument handling shared by every softmax-attention backend.

`prepare` validates user input once and returns an `AttentionCall`: rank-4
arrays plus normalized static config. Backends take an `AttentionCall` and
return `(out, lse)` with out `[B, T, N, Hv]` in the query dtype and lse
`[B, N, T]` float32 (-inf on rows with nothing to attend to).

The position rule (one place, used by the dense masks, the chunked block
loops and the masked-slot zeroing): query i sits at key coordinate
`i + position_shift`, where `position_shift = q_offset - kv_offset` (or
`S - T` for `causal_alignment='bottom_right'`); causal attention lets it see
keys j <= i + shift, a (left, right) window keys in
[i + shift - left, i + shift + right].

Logits, in order: `scale * q.k`, `+ bias`, then the soft cap
`cap * tanh(x / cap)` (tokamax's convention, Gemma-2's without bias; a -inf
bias entry stays -inf, i.e. still masks), then masking. A per-head sink logit
joins the softmax denominator after all of that (it is neither scaled nor
capped, as in gpt-oss) and carries no value.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax._checks import (as_array, check_broadcastable, check_ids,
                             check_qkv, check_rate, check_scale,
                             normalize_window)

# The padding segment ids (never equal between a query and a key, so those
# pairs are masked) and the finite stand-in for -inf on masked logits: rules
# the kernels share, defined once in pallas_kernels/_rules.py.
from pallas_kernels._rules import (KV_PAD_SEGMENT, MASK_VALUE,  # noqa: F401
                                   Q_PAD_SEGMENT)


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
  # Options beyond jax.nn's (backends that lack one refuse, see `extensions`).
  soft_cap: Optional[float] = None    # logits -> cap * tanh(logits / cap)
  sinks: Optional[jax.Array] = None   # [N] float: per-head sink logit
  # Query i sits at key coordinate i + position_shift: a Python int, or an
  # int32 [B] array (per-example offsets). 0 unless causal/window is on.
  position_shift: Any = 0
  # None, or (q.k precision, p.v precision) for the matmuls.
  precision: Optional[Tuple[Any, Any]] = None

  def extensions(self) -> Tuple[str, ...]:
    """Names of the options used here that not every backend implements
    (empty for a call jax.nn / the kernels can serve)."""
    used = []
    if self.soft_cap is not None:
      used.append("logits_soft_cap")
    if self.sinks is not None:
      used.append("sinks")
    if not (isinstance(self.position_shift, int) and self.position_shift == 0):
      used.append("position offsets (q_offset/kv_offset or "
                  "causal_alignment='bottom_right' with q_len != kv_len)")
    if self.precision is not None:
      used.append("precision")
    return tuple(used)

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
    reach = self.effective_window()
    if reach is not None:
      parts.append(band_mask(t, s, reach[0], reach[1], self.position_shift))
    if self.q_segment_ids is not None:
      parts.append(masks_lib.segment_mask(self.q_segment_ids,
                                          self.kv_segment_ids))
    m = masks_lib.and_masks(*parts)
    return masks_lib.as_4d(m)


def restore_batch(x, batch_shape: Tuple[int, ...]):
  """[B, ...] -> batch_shape + [...]: undoes `prepare`'s batch flattening
  (batch_shape () drops the unit batch of an unbatched call)."""
  if x is None:
    return None
  return x.reshape(tuple(batch_shape) + tuple(x.shape[1:]))


def _flatten_lead(name, x, batch_shape, trailing, what):
  """Broadcasts x (right-aligned) to batch_shape + trailing-dims pattern and
  flattens the batch dims into one (kept at 1 when x does not vary there)."""
  nb = len(batch_shape)
  full = tuple(batch_shape) + tuple(trailing)
  check_broadcastable(name, x, full, what=what)
  x = x.reshape((1,) * (len(full) - x.ndim) + tuple(x.shape))
  lead, rest = x.shape[:nb], x.shape[nb:]
  if all(d == 1 for d in lead):
    return x.reshape((1,) + rest)
  x = jnp.broadcast_to(x, tuple(batch_shape) + rest)
  return x.reshape((math.prod(batch_shape),) + rest)


def _check_soft_cap(cap):
  if cap is None:
    return None
  if isinstance(cap, (bool, np.bool_)) or isinstance(cap, jax.core.Tracer):
    raise ValueError(
        f"`logits_soft_cap` must be a positive finite number, got {cap!r}.")
  try:
    v = float(cap)
  except (TypeError, ValueError):
    raise ValueError(
        f"`logits_soft_cap` must be a positive finite number, got {cap!r}."
    ) from None
  if not (math.isfinite(v) and v > 0):
    raise ValueError(
        f"`logits_soft_cap` must be a positive finite number, got {cap!r}.")
  return v


def _check_precision(precision):
  """None, one precision for both matmuls, or a (q.k, p.v) pair -> None or
  a pair of `jax.lax.Precision` (entries may be None)."""
  if precision is None:
    return None
  pair = (tuple(precision) if isinstance(precision, (tuple, list))
          else (precision, precision))
  if len(pair) != 2:
    raise ValueError(
        "`precision` must be a precision or a (q.k, p.v) pair, got "
        f"{precision!r}.")
  out = []
  for p in pair:
    if p is None or isinstance(p, jax.lax.Precision):
      out.append(p)
      continue
    try:
      out.append(jax.lax.Precision(p))
    except (ValueError, TypeError, KeyError):
      raise ValueError(
          f"`precision` entries must be jax.lax.Precision or one of "
          f"'default', 'high', 'highest', got {p!r}.") from None
  return tuple(out)


def _position_shift(t, s, b, batch_shape, causal_alignment, q_offset,
                    kv_offset):
  """`position_shift` (see the module docstring): a Python int, or an
  int32 [B] array when an offset is an array."""
  if causal_alignment not in ("top_left", "bottom_right"):
    raise ValueError(
        "`causal_alignment` must be 'top_left' or 'bottom_right', got "
        f"{causal_alignment!r}.")
  explicit = q_offset is not None or kv_offset is not None
  if causal_alignment == "bottom_right":
    if explicit:
      raise ValueError(
          "give either causal_alignment='bottom_right' or "
          "`q_offset`/`kv_offset`, not both.")
    return s - t
  static, dynamic = 0, None
  for name, off, sign in (("q_offset", q_offset, 1),
                          ("kv_offset", kv_offset, -1)):
    if off is None:
      continue
    if isinstance(off, (bool, np.bool_)):
      raise ValueError(f"`{name}` must be an integer, got {off!r}.")
    if isinstance(off, (int, np.integer)) or (
        isinstance(off, np.ndarray) and off.ndim == 0 and
        np.issubdtype(off.dtype, np.integer)):
      static += sign * int(off)
      continue
    a = jnp.asarray(off)
    if not jnp.issubdtype(a.dtype, jnp.integer):
      raise ValueError(
          f"`{name}` must be an integer or an integer array broadcastable "
          f"to the batch shape {tuple(batch_shape)}, got dtype {a.dtype}.")
    a = _flatten_lead(name, a, batch_shape, (), what="the batch shape")
    a = jnp.broadcast_to(a.reshape(-1), (b,)).astype(jnp.int32)
    dynamic = sign * a if dynamic is None else dynamic + sign * a
  # Shifts beyond +-(2 (t + s) + 1) act like those bounds (every key or none
  # in reach, windows being capped at t + s): clipping keeps int32 safe.
  cap = 2 * (t + s) + 1
  if dynamic is None:
    return max(-cap, min(cap, static))
  return jnp.clip(dynamic + static, -cap, cap).astype(jnp.int32)


def _check_sinks(sinks, n):
  if sinks is None:
    return None
  sinks = jnp.asarray(sinks)
  if sinks.shape != (n,) or not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise ValueError(
        f"`sinks` must be a float array of shape ({n},) (one logit per query "
        f"head), got {sinks.shape} ({sinks.dtype}).")
  return sinks


def prepare(query, key, value, bias=None, mask=None, *, scale=None,
            is_causal=False, local_window_size=None, query_seq_lengths=None,
            key_value_seq_lengths=None, q_segment_ids=None,
            kv_segment_ids=None, dropout_rate=0.0, dropout_rng=None,
            logits_soft_cap=None, sinks=None, causal_alignment="top_left",
            q_offset=None, kv_offset=None, precision=None):
  """Validates inputs; returns (AttentionCall, batch_shape).

  `batch_shape` is () for unbatched [T, N, H] inputs, (B,) for rank 4, and
  the leading dims of [..., T, N, H] inputs, which are flattened into one
  batch dim here; `restore_batch` undoes it on the results.

  Key/value slots that no query can attend to (see `kv_live`) are zeroed
  with jnp.where, so whatever they hold (NaN, Inf, garbage from a padded
  cache) never reaches an output or a gradient, in every backend.
  """
  query = as_array("query", query)
  key = as_array("key", key)
  value = as_array("value", value)
  batch_shape = None
  if max(query.ndim, key.ndim, value.ndim) > 4:
    if not (query.ndim == key.ndim == value.ndim) or not (
        query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
      raise ValueError(
          "`query`, `key` and `value` must have the same leading batch dims "
          f"[..., len, heads, head_dim], got shapes query={query.shape}, "
          f"key={key.shape}, value={value.shape}.")
    batch_shape = tuple(query.shape[:-3])
    nb = math.prod(batch_shape)
    query = query.reshape((nb,) + query.shape[-3:])
    key = key.reshape((nb,) + key.shape[-3:])
    value = value.reshape((nb,) + value.shape[-3:])
  b, t, n, s, k, h, hv = check_qkv(query, key, value)
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  multi = batch_shape is not None
  if batch_shape is None:
    batch_shape = () if unbatched else (b,)
  what = "[batch..., heads, q_len, kv_len]"
  target = batch_shape + (n, t, s) if multi else (b, n, t, s)
  if bias is not None:
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"`bias` must be floating point, got dtype {bias.dtype}.")
    if bias.ndim > len(target):
      raise ValueError(
          f"`bias` must have rank <= {len(target)}, got shape {bias.shape}.")
    check_broadcastable("bias", bias, target, what=what)
    bias = (_flatten_lead("bias", bias, batch_shape, (n, t, s), what)
            if multi else masks_lib.as_4d(bias))
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError(
          f"`mask` must be boolean (True = attend), got dtype {mask.dtype}.")
    if mask.ndim > len(target):
      raise ValueError(
          f"`mask` must have rank <= {len(target)}, got shape {mask.shape}.")
    check_broadcastable("mask", mask, target, what=what)
    mask = (_flatten_lead("mask", mask, batch_shape, (n, t, s), what)
            if multi else masks_lib.as_4d(mask))
  if multi:
    # Per-example arguments: flatten their batch dims the same way.
    flat = lambda name, x, trailing: None if x is None else jnp.broadcast_to(
        _flatten_lead(name, jnp.asarray(x), batch_shape, trailing,
                      "[batch...]" + ("" if not trailing else ", len")),
        (b,) + tuple(trailing))
    q_segment_ids = flat("q_segment_ids", q_segment_ids, (t,))
    kv_segment_ids = flat("kv_segment_ids", kv_segment_ids, (s,))
    query_seq_lengths = flat("query_seq_lengths", query_seq_lengths, ())
    key_value_seq_lengths = flat("key_value_seq_lengths",
                                 key_value_seq_lengths, ())
  window = normalize_window(local_window_size)
  if window is not None:
    # A reach beyond t + s is unbounded in effect; capping it keeps every
    # position computation inside int32 (a window of 2**31 means "all").
    window = (min(window[0], t + s), min(window[1], t + s))
  soft_cap = _check_soft_cap(logits_soft_cap)
  sinks = _check_sinks(sinks, n)
  precision = _check_precision(precision)
  shift = _position_shift(t, s, b, batch_shape, causal_alignment, q_offset,
                          kv_offset)
  if not is_causal and window is None:
    shift = 0   # positions matter only to causal / window masking
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
                 is_causal, window, b, t, n, s, k, shift=shift)
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
      raw_segment_ids=raw_segments, soft_cap=soft_cap, sinks=sinks,
      position_shift=shift, precision=precision)
  return call, batch_shape


def empty_result(call: AttentionCall, need_lse: bool = True):
  """(out, lse) of a call with a zero-size dim: zeros [B, T, N, Hv] in the
  query dtype, lse [B, N, T] -inf (nothing to attend to), or None."""
  b, t, n, s, k, h, hv = call.shape
  out = jnp.zeros((b, t, n, hv), call.query.dtype)
  lse = None
  if need_lse:
    if call.sinks is not None and s == 0:
      # Only the sink is left in the denominator.
      lse = jnp.broadcast_to(call.sinks.astype(jnp.float32)[None, :, None],
                             (b, n, t))
    else:
      lse = jnp.full((b, n, t), -jnp.inf, jnp.float32)
  return out, lse


def band_mask(t: int, s: int, left, right, shift=0):
  """Bool [B|1, 1, T, S] (or None when both reaches are unbounded): key j is
  in reach of query i iff i + shift - left <= j <= i + shift + right.

  The single position rule behind causal masks, local windows and their
  offsets; `shift` is a Python int or an int32 [B] array.
  """
  if not (math.isfinite(left) or math.isfinite(right)):
    return None
  i = jnp.arange(t, dtype=jnp.int32)[:, None]
  j = jnp.arange(s, dtype=jnp.int32)[None, :]
  if isinstance(shift, int):
    qpos = (i + shift)[None, None]
  else:
    qpos = i[None, None] + jnp.asarray(shift, jnp.int32).reshape(-1, 1, 1, 1)
  out = None
  if math.isfinite(left):
    out = j[None, None] >= qpos - int(left)
  if math.isfinite(right):
    r = j[None, None] <= qpos + int(right)
    out = r if out is None else out & r
  return out


def _segment_live(q_seg, kv_seg):
  """[B, S] bool: kv_seg[b, j] occurs among q_seg[b, :] (sort + search,
  O((T + S) log T), no [T, S] array)."""
  def one(q, kv):
    qs = jnp.sort(q)
    idx = jnp.clip(jnp.searchsorted(qs, kv), 0, qs.shape[0] - 1)
    return qs[idx] == kv
  return jax.vmap(one)(q_seg, kv_seg)


def kv_live(mask, q_segment_ids, kv_segment_ids, query_seq_lengths,
            is_causal, window, b, t, n, s, k, shift=0):
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
  left, right = (math.inf, math.inf) if window is None else window
  if is_causal:
    right = min(right, 0)
  j = jnp.arange(s, dtype=jnp.int32)
  static = isinstance(shift, int)
  sh = shift if static else jnp.asarray(shift, jnp.int32)[:, None]
  if math.isfinite(right):
    if query_seq_lengths is not None:
      last = jnp.clip(query_seq_lengths, 0, t)[:, None] - 1  # last valid query
      parts.append((j[None, :] <= last + sh + int(right))[:, :, None, None])
    elif not static or t - 1 + shift + right < s - 1:
      parts.append((j[None, :] <= t - 1 + sh + int(right))[:, :, None, None])
  if math.isfinite(left) and (not static or shift - left > 0):
    # Query 0 reaches furthest left: keys before its reach are dead.
    parts.append((j[None, :] >= sh - int(left))[:, :, None, None])
  if not parts:
    return None
  out = parts[0]
  for p in parts[1:]:
    out = jnp.logical_and(out, p)
  return out


def input_live(b: int, t: int, s: int, *, mask=None, is_causal=False,
               local_window_size=None, query_seq_lengths=None,
               key_value_seq_lengths=None, q_segment_ids=None,
               kv_segment_ids=None, causal_alignment="top_left",
               q_offset=None, kv_offset=None):
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
  shift = _position_shift(t, s, b, (b,), causal_alignment, q_offset,
                          kv_offset)
  live = kv_live(mask, q_segment_ids, kv_segment_ids, qlen, bool(is_causal),
                 window, b, t, 1, s, 1, shift=shift)
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
