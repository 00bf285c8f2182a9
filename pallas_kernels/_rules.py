"""Rules shared by the XLA paths (attnjax) and the kernels (pallas_kernels).

This module is the bottom of the import graph: it imports only jax and
numpy, and both `attnjax` and `pallas_kernels` import their rules from here,
so each rule is written once:

  * `check_segment_ids` / `check_ids`: packed-sequence segment ids
    (both or neither, int [B, T] / [B, S] -> int32);
  * `check_qkv`: the query/key/value layout check ([B, T, N, H] /
    [B, S, K, H] / [B, S, K, Hv], N % K == 0), ValueError naming the argument
    and the shapes;
  * `is_int`, `normalize_window`: integer scalars and the `(left, right)`
    local-window normalisation;
  * `Q_PAD_SEGMENT`, `KV_PAD_SEGMENT`: the segment ids padding positions get
    (never equal between a query and a key, so padding pairs are masked);
  * `MASK_VALUE`: the finite stand-in for -inf on masked logits;
  * `default_scale`, `cdiv`, `round_up`;
  * `divide_or_zero`: the normalisation of the linear-attention family
    (num / den where den != 0, else 0; no epsilon unless the caller adds one),
    and `LINEAR_FEATURE_MAPS`, its named feature maps.

It lives in `pallas_kernels` because kernels must not import attnjax; it is
private to the two packages (not part of either public API).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Segment id given to padded / beyond-length positions: a query pad never
# equals a key pad, so those pairs are masked.
Q_PAD_SEGMENT = -(2**31)
KV_PAD_SEGMENT = -(2**31) + 1
# Finite stand-in for -inf on masked logits (so jax.debug_infs holds): the
# lowest finite float32, so it never beats a real logit in a row max (a real
# logit is >= it or -inf; a tie is harmless). Masked probabilities are zeroed
# with a select, never by this value alone, and a row with nothing to attend
# to is recognised by its normalizer (l == 0), never by comparing a logit or
# an lse with this value (a real row whose logits all sit at the lowest
# float32 has lse == MASK_VALUE too). Float32 only: it overflows to -inf in
# bfloat16/float16, so it is used on float32 logits.
MASK_VALUE = float(np.finfo(np.float32).min)


def cdiv(a: int, b: int) -> int:
  """ceil(a / b) for ints."""
  return -(-a // b)


def round_up(x: int, m: int) -> int:
  """Smallest multiple of m that is >= x."""
  return cdiv(x, m) * m


def default_scale(scale: Optional[float], head_dim: int) -> float:
  """The logit scale: `scale` when given, else 1/sqrt(head_dim) (1.0 for an
  empty head dim). A NaN or infinite `scale` is a ValueError naming it (it
  would silently turn every output into NaN)."""
  if scale is not None:
    v = float(scale)
    if not math.isfinite(v):
      raise ValueError(f"`scale` must be a finite number, got {scale!r}.")
    return v
  return 1.0 / math.sqrt(head_dim) if head_dim else 1.0


def is_int(x) -> bool:
  """True for Python/NumPy/concrete JAX integer scalars (not bools, floats
  or traced values)."""
  if isinstance(x, (bool, np.bool_)):
    return False
  if isinstance(x, (int, np.integer)):
    return True
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  return (shape == () and dtype is not None
          and jnp.issubdtype(dtype, jnp.integer)
          and not isinstance(x, jax.core.Tracer))


def normalize_window(local_window_size, name: str = "local_window_size"
                     ) -> Optional[Tuple[int, int]]:
  """int w -> (w, w); (left, right) kept; None -> None.

  Query i may see keys i - left .. i + right. Integers may be Python, NumPy
  or concrete JAX scalars; floats (scalar or in the pair), bools and
  negative values raise ValueError naming `name`.
  """
  if local_window_size is None:
    return None
  bad = ValueError(
      f"`{name}` must be an int >= 0 or a (left, right) pair of ints >= 0, "
      f"got {local_window_size!r}.")
  if is_int(local_window_size):
    left = right = local_window_size
  else:
    try:
      left, right = local_window_size
    except (TypeError, ValueError):
      raise bad from None
    if not (is_int(left) and is_int(right)):
      raise bad
  left, right = int(left), int(right)
  if left < 0 or right < 0:
    raise ValueError(
        f"`{name}` must be non-negative, got {local_window_size!r}.")
  return left, right


def check_rank(name: str, x, ranks: Sequence[int]) -> None:
  if x.ndim not in ranks:
    raise ValueError(
        f"`{name}` must have rank in {tuple(ranks)}, got shape "
        f"{tuple(x.shape)} (rank {x.ndim}).")


def check_floating(name: str, x) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"`{name}` must be floating point, got dtype {x.dtype}.")


def check_qkv(query, key, value, *, allow_unbatched: bool = True,
              same_value_dim: bool = False):
  """Validates [B, T, N, H] / [B, S, K, H] / [B, S, K, Hv] attention inputs.

  Returns (B, T, N, S, K, H, Hv). Unbatched rank-3 inputs are accepted when
  `allow_unbatched` (B is then 1; the caller adds/removes the batch dim).
  `same_value_dim` additionally requires Hv == H. Errors are ValueErrors
  naming the argument and the shapes received.
  """
  ranks = (3, 4) if allow_unbatched else (4,)
  check_rank("query", query, ranks)
  check_rank("key", key, ranks)
  check_rank("value", value, ranks)
  if not (query.ndim == key.ndim == value.ndim):
    raise ValueError(
        "`query`, `key` and `value` must have the same rank, got shapes "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
        f"value={tuple(value.shape)}.")
  for n, x in (("query", query), ("key", key), ("value", value)):
    check_floating(n, x)
  q = query.shape if query.ndim == 4 else (1,) + tuple(query.shape)
  k = key.shape if key.ndim == 4 else (1,) + tuple(key.shape)
  v = value.shape if value.ndim == 4 else (1,) + tuple(value.shape)
  b, t, n, h = q
  bk, s, kh, hk = k
  bv, sv, kv, hv = v
  if bk != b or bv != b:
    raise ValueError(
        "batch sizes of `query`, `key`, `value` differ: shapes "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}, "
        f"value={tuple(value.shape)}.")
  if hk != h:
    raise ValueError(
        f"`key` head_dim {hk} must equal `query` head_dim {h}: shapes "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
  if sv != s or kv != kh:
    raise ValueError(
        "`key` and `value` must agree in kv_len and kv_heads: shapes "
        f"key={tuple(key.shape)}, value={tuple(value.shape)}.")
  if same_value_dim and hv != h:
    raise ValueError(
        f"`value` head_dim {hv} must equal `query` head_dim {h} for this "
        f"implementation: shapes query={tuple(query.shape)}, "
        f"value={tuple(value.shape)}.")
  if kh == 0 or n % kh != 0:
    raise ValueError(
        f"`query` heads ({n}) must be a multiple of the kv heads of "
        f"`key`/`value` ({kh}) for grouped-query attention: shapes "
        f"query={tuple(query.shape)}, key={tuple(key.shape)}.")
  return b, t, n, s, kh, h, hv


# Named feature maps phi of kernelized (linear) attention.
LINEAR_FEATURE_MAPS = {
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def check_ids(name: str, ids, batch: int, length: int):
  """Int array [batch, length] -> int32, else ValueError naming `name`."""
  ids = jnp.asarray(ids)
  if ids.shape != (batch, length) or not jnp.issubdtype(ids.dtype,
                                                        jnp.integer):
    raise ValueError(
        f"`{name}` must be an int array of shape {(batch, length)}, got "
        f"{ids.shape} ({ids.dtype}).")
  return ids.astype(jnp.int32)


def check_segment_ids(q_segment_ids, kv_segment_ids, batch: int, q_len: int,
                      kv_len: int):
  """Both or neither; -> (int32 [B, T], int32 [B, S]) or (None, None)."""
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError(
        "give both `q_segment_ids` and `kv_segment_ids`, or neither.")
  if q_segment_ids is None:
    return None, None
  return (check_ids("q_segment_ids", q_segment_ids, batch, q_len),
          check_ids("kv_segment_ids", kv_segment_ids, batch, kv_len))


def divide_or_zero(num, den):
  """num / den where den != 0, else 0 (den broadcastable to num).

  The normalisation rule of linear attention: a row with no key mass (e.g. a
  zero query under a ReLU feature map, or every key masked) gives zeros, not
  NaN, and no epsilon shifts the other rows.
  """
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Neighborhood attention (NATTEN) window rule. Owner: neighborhood attention
# (attnjax/spatial/neighborhood.py, pallas_kernels/neighborhood.py and the
# kernels' neighborhood mode all use these; nothing else restates the rule).
# ----------------------------------------------------------------------------

def na_group_length(length, group, dilation):
  """Length of dilation group `group` (positions group, group + d, ...) of an
  axis of `length`: ceil((length - group) / dilation). Ints or arrays."""
  return (length - group + dilation - 1) // dilation


def na_window(q, n, kernel_size: int, stride: int = 1,
              is_causal: bool = False, xp=np):
  """(first, last) in-group key of in-group query `q`'s window, inclusive.

  NATTEN semantics on one axis of a dilation group of length `n`
  (kernel_size <= n, 1 <= stride <= kernel_size):

  * Stride groups. Queries are grouped in blocks of `stride` consecutive
    in-group positions; every query of a block takes the window of the
    block's leader: the centre query min(block * stride + stride // 2, n - 1)
    (right of centre for even stride), or the last one
    min(block * stride + stride - 1, n - 1) when causal. stride == 1 makes
    each query its own leader (plain neighborhood attention); stride ==
    kernel_size tiles the axis into non-overlapping windows.
  * Non-causal: first = clamp(leader - kernel_size // 2, 0, n - kernel_size),
    last = first + kernel_size - 1 (centred where possible, shifted inward at
    the borders, always kernel_size keys; even kernels have one more key
    before than after).
  * Causal: first = max(leader - kernel_size + 1, 0), last = q (the query
    itself, not the leader: no key ahead of the query).

  `q` and `n` may be ints, NumPy arrays (xp=np) or traced jnp values
  (xp=jnp, e.g. inside a kernel); kernel_size/stride/is_causal are static.
  """
  block = q // stride
  if is_causal:
    leader = xp.minimum(block * stride + stride - 1, n - 1)
    first = xp.maximum(leader - kernel_size + 1, 0)
    return first, q
  leader = xp.minimum(block * stride + stride // 2, n - 1)
  first = xp.clip(leader - kernel_size // 2, 0, n - kernel_size)
  return first, first + kernel_size - 1


def na_query_reach(kernel_size: int, is_causal: bool) -> Tuple[int, int]:
  """(before, after): the in-group queries whose window holds in-group key j
  lie in [j - before, j + after] ((kernel_size - 1, kernel_size - 1), or
  (0, kernel_size - 1) when causal). Holds for every stride <= kernel_size
  (checked exhaustively in tests/spatial/test_neighborhood_features.py); a
  kernel's backward pass uses it to bound the query tiles a key tile visits.
  """
  return (0 if is_causal else kernel_size - 1, kernel_size - 1)
