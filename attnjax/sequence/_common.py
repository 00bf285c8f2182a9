"""Helpers shared by the sequence attention family (not public API)."""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._checks import check_broadcastable, check_qkv
# One definition each, shared with the kernels (re-exported for the family).
from pallas_kernels._rules import default_scale, round_up  # noqa: F401

# The four attention patterns a mechanism may support.
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def prepare_qkv(query, key, value, *, same_value_dim=False):
  """Validates BTNH/BSKH inputs; adds a batch dim to rank-3 inputs.

  Returns (query, key, value, dims, unbatched) with dims = (B, T, N, S, K, H, Hv).
  """
  dims = check_qkv(query, key, value, same_value_dim=same_value_dim)
  unbatched = query.ndim == 3
  if unbatched:
    query, key, value = query[None], key[None], value[None]
  return query, key, value, dims, unbatched


def empty_output(dims, dtype, unbatched: bool = False):
  """Zeros [B, T, N, Hv] of `dtype` ([T, N, Hv] if unbatched) when batch,
  q_len or kv_len is 0 (dims = (B, T, N, S, K, H, Hv)); None otherwise.

  An empty key set gives zero rows, as `attnjax.dot_product_attention` does,
  and an empty batch or query length an empty result; the output does not
  depend on the inputs, so their gradients are zeros of their shapes.
  Mechanisms call it after validating their arguments, before any work
  (reductions, block counts and modulos over an empty axis would fail).
  """
  b, t, n, s, _, _, hv = dims
  if b and t and s:
    return None
  out = jnp.zeros((b, t, n, hv), dtype)
  return out[0] if unbatched else out




def key_padding_mask(mask, b: int, n: int, t: int, s: int, *, mechanism: str,
                     unbatched: bool = False):
  """Reduces a boolean `mask` to a key-padding mask [B, S] (or None).

  Mechanisms that never form the [T, S] score matrix can only apply masks that
  do not depend on the query position or the head: shapes broadcastable to
  [B, 1, 1, S]. Anything else raises NotImplementedError saying why.
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(
        f"`mask` must be boolean (True = attend), got dtype {mask.dtype}.")
  if mask.ndim > 4:
    raise ValueError(f"`mask` must have rank <= 4, got shape {mask.shape}.")
  if unbatched and mask.ndim == 4:
    raise ValueError(
        f"`mask` of rank 4 given with unbatched inputs: shape {mask.shape}.")
  check_broadcastable("mask", mask, (b, n, t, s))
  m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  if m4.shape[1] != 1 or m4.shape[2] != 1:
    raise NotImplementedError(
        f"{mechanism} never forms the [q_len, kv_len] score matrix, so it can "
        "only apply key-padding masks broadcastable to [batch, 1, 1, kv_len]; "
        f"got `mask` with shape {mask.shape}.")
  return jnp.broadcast_to(m4[:, 0, 0, :], (b, s))


# Finite stand-ins for -inf / +inf (jax.debug_infs stays quiet; a masked
# entry is excluded by an explicit select) and the one masked softmax.
from attnjax._numerics import NEG, POS, masked_softmax  # noqa: E402,F401


def zero_masked(x, kv_mask):
  """x [B, S, ...] with the slots where `kv_mask` [B, S] is False set to 0.

  A select (jnp.where), never a product, so whatever a masked key/value slot
  holds (NaN, Inf, uninitialised cache memory) reaches no output, and its
  gradient is exactly zero. None: x unchanged.
  """
  if kv_mask is None:
    return x
  keep = kv_mask.reshape(kv_mask.shape + (1,) * (x.ndim - kv_mask.ndim))
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def to_groups(x, step: int):
  """[B, L, ...] -> [ceil(L / step), B, step, ...], zero-padded: the scanned
  inputs of the loops that keep a group of positions in cache (issue 22)."""
  b, length = x.shape[:2]
  padded = round_up(length, step)
  x = jnp.pad(x, ((0, 0), (0, padded - length)) + ((0, 0),) * (x.ndim - 2))
  return jnp.moveaxis(x.reshape((b, padded // step, step) + x.shape[2:]), 1, 0)


def reject(name: str, value, mechanism: str, why: str):
  """Raises NotImplementedError when an unsupported keyword is given."""
  if value is None or (isinstance(value, (bool, int, float)) and not value):
    return
  raise NotImplementedError(f"{mechanism} does not support `{name}`: {why}")




def pattern_of(is_causal: bool, is_cross: bool) -> str:
  return ("causal_" if is_causal else "noncausal_") + (
      "cross" if is_cross else "self")


def check_positive_int(name: str, x) -> int:
  """Python or NumPy integer > 0 (not bool) -> int; else ValueError."""
  if (isinstance(x, (bool, np.bool_)) or
      not isinstance(x, (int, np.integer)) or x <= 0):
    raise ValueError(f"`{name}` must be a positive int, got {x!r}.")
  return int(x)


def split_heads(x, k: int) -> Tuple:
  """[B, T, N, H] -> [B, T, K, G, H] (GQA grouping)."""
  b, t, n, h = x.shape
  return x.reshape(b, t, k, n // k, h)
