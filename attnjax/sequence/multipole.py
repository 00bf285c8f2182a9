"""Multipole attention (Colagrande, Caillon, Feillet, Allauzen 2025, "Linear
attention with global context: a multipole attention mechanism for vision
and physics", MANO), on sequences.

A V-cycle over `levels` resolutions, as the fast multipole method: level 0
is exact sliding-window softmax attention (window `window_size`) on the
tokens; level l >= 1 mean-pools queries, keys and values over aligned
blocks of 2**l tokens, runs the same windowed attention on the coarse
sequence (so it reaches 2**l times farther), and its output is upsampled
back (each token takes its block's output). The output is the sum over
levels. Every level costs O(len / 2**l * window), so the total is linear
in length, and with enough levels (the default: until one window spans the
coarsest sequence) every head has a global receptive field. MANO learns
its down/up-sampling (convolutions shared across levels); this primitive
uses mean pooling and nearest upsampling, parameter-free. A key-padding
mask pools only the kept keys (a coarse key with none kept is masked).

Not causal: a pooled query or key mixes positions of its whole block, so
a causal call raises NotImplementedError.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.sparse import (sliding_window_attention,
                                     sliding_window_attention_reference)

SUPPORT = {
    "noncausal_self": True,
    "causal_self": False,
    "noncausal_cross": True,
    "causal_cross": False,
}


def default_levels(length: int, window_size: int) -> int:
  """Levels until 2 * window + 1 coarse tokens cover `length`."""
  span = 2 * max(1, window_size) + 1
  return 1 + max(0, math.ceil(math.log2(max(1, length) / span)))


def pool(x, factor: int, keep=None):
  """Mean over aligned blocks of `factor` positions of x [B, L, ...] (only
  the positions where `keep` [B, L] is True; the last block may be short).
  Returns (pooled [B, ceil(L/factor), ...], block kept [B, ceil(L/factor)])."""
  b, length = x.shape[:2]
  n = -(-length // factor)
  k = (jnp.arange(n * factor) < length)[None]
  k = k if keep is None else k & jnp.pad(keep, ((0, 0), (0, n * factor -
                                                         length)))
  k = jnp.broadcast_to(k, (b, n * factor))
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * factor - length)) +
               ((0, 0),) * (x.ndim - 2))
  kk = k.reshape((b, n * factor) + (1,) * (x.ndim - 2))
  xp = jnp.where(kk, xp, 0.0).reshape((b, n, factor) + x.shape[2:])
  cnt = jnp.sum(k.reshape(b, n, factor), -1)
  mean = jnp.sum(xp, 2) / jnp.maximum(cnt, 1).reshape(
      (b, n) + (1,) * (x.ndim - 2))
  return mean, cnt > 0


def _levels(levels, t, s, window):
  if levels is None:
    return default_levels(max(t, s), window)
  return _common.check_positive_int("levels", levels)


def _window(window_size):
  if (isinstance(window_size, (bool, np.bool_)) or
      not isinstance(window_size, (int, np.integer)) or window_size < 0):
    raise ValueError(f"`window_size` must be an int >= 0, got "
                     f"{window_size!r}.")
  return int(window_size)


def _multipole(attend, query, key, value, window, levels, scale, kv_mask):
  b, t = query.shape[:2]
  out = jnp.zeros(query.shape[:3] + value.shape[-1:], jnp.float32)
  for lvl in range(levels):
    f = 2 ** lvl
    if f == 1:
      q, k, v, km = query, key, value, kv_mask
    else:
      q, _ = pool(query, f)
      k, km = pool(key, f, kv_mask)
      v, _ = pool(value, f, kv_mask)
    o = attend(q, k, v, window, scale=scale,
               mask=None if km is None else km[:, None, None, :])
    out = out + jnp.repeat(o.astype(jnp.float32), f, axis=1)[:, :t]
  return out.astype(query.dtype)


_OP = Op("multipole_attention")


@_OP.register("xla")
def _xla(config, query, key, value, *, window, levels, scale, kv_mask):
  del config
  return _multipole(sliding_window_attention, query, key, value, window,
                    levels, scale, kv_mask)


def _prepare(query, key, value, window_size, levels, is_causal, mask):
  if is_causal:
    raise NotImplementedError(
        "multipole_attention is not causal: a pooled query or key mixes the "
        "positions of its whole block.")
  window = _window(window_size)
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="multipole_attention",
                                     unbatched=unbatched)
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  if kv_mask is None:
    kv_mask = jnp.ones((b, s), bool)
  return (query, key, value, unbatched, kv_mask, window,
          _levels(levels, t, s, window))


def multipole_attention(query, key, value, *, window_size: int = 8,
                        levels: Optional[int] = None, is_causal: bool = False,
                        scale: Optional[float] = None, mask=None, bias=None,
                        dropout_rate: float = 0.0, dropout_rng=None,
                        implementation=None):
  """Multi-level windowed attention summed over resolutions (MANO).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    window_size: w, the window (keys i-w..i+w) at every level, in that
      level's tokens.
    levels: number of levels (default `default_levels(max(T, S), w)`: the
      coarsest window spans the whole sequence).
    is_causal: must be False (NotImplementedError).
    scale: softmax scale at every level (default 1/sqrt(H)).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla'.

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  _common.reject("bias", bias, "multipole_attention",
                 "scores are computed per level on pooled tokens.")
  _common.reject("dropout_rate", dropout_rate, "multipole_attention",
                 "attention dropout is not implemented for the levels.")
  query, key, value, unbatched, kv_mask, window, levels = _prepare(
      query, key, value, window_size, levels, is_causal, mask)
  out = _OP(implementation, query, key, value, window=window, levels=levels,
            scale=scale, kv_mask=kv_mask)
  return out[0] if unbatched else out


def multipole_attention_reference(query, key, value, *, window_size: int = 8,
                                  levels: Optional[int] = None,
                                  is_causal: bool = False,
                                  scale: Optional[float] = None, mask=None):
  """The same levels with dense banded softmax at each level."""
  query, key, value, unbatched, kv_mask, window, levels = _prepare(
      query, key, value, window_size, levels, is_causal, mask)
  out = _multipole(sliding_window_attention_reference, query, key, value,
                   window, levels, scale, kv_mask)
  return out[0] if unbatched else out


class MultipoleAttention(MultiHeadAttention):
  """MultiHeadAttention with `multipole_attention(window_size, levels)`
  (non-causal)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               window_size: int = 8, levels: Optional[int] = None, **kwargs):
    self.window_size = _window(window_size)
    self.levels = None if levels is None else _common.check_positive_int(
        "levels", levels)
    super().__init__(num_heads, in_features, *args, attention_fn=self._attend,
                     **kwargs)

  def _attend(self, q, k, v, **kwargs):
    return multipole_attention(q, k, v, window_size=self.window_size,
                               levels=self.levels, **kwargs)
