"""Multi-Scale Window Attention (MSWA; Xu et al. 2025, "MSWA: Refining local
attention with multi-scale window attention").

Sliding-window softmax attention whose window differs per head (MSWA-h) and
per layer (MSWA-l). `mswa_attention(q, k, v, window_sizes)` takes one window
per query head; heads sharing a window are computed together by
`sliding_window_attention` (gathered key blocks, linear in length), so the
cost is that of the widest group per group of heads.

`mswa_window_sizes(num_heads, base_window, layer=, num_layers=)` is the
allocation: heads split (in order) into four groups with windows
base * (1/4, 1/2, 1, 2), and the layers likewise into four groups (shallow to
deep) whose base is scaled by the same factors; every head of every layer
then uses base * s_layer * s_head, on average (15/16)**2 = 225/256 of a
uniform window's budget.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from attnjax import masks as masks_lib
from attnjax._checks import normalize_window
from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.sparse import sliding_window_attention
from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}

SCALES = (0.25, 0.5, 1.0, 2.0)


def _groups(count: int, parts: int):
  """Group index of each of `count` items split in order into `parts`."""
  return (np.arange(count) * parts) // count


def mswa_window_sizes(num_heads: int, base_window: int, *, layer: int = 0,
                      num_layers: int = 1, scales: Sequence[float] = SCALES
                      ) -> tuple:
  """Per-head windows of `layer` in a stack of `num_layers` (MSWA-h x -l).

  With num_layers=1 only the head allocation applies (MSWA-h with base
  `base_window`); `scales` are the four group factors. Windows are ints >= 1.
  """
  n = _common.check_positive_int("num_heads", num_heads)
  w = _common.check_positive_int("base_window", base_window)
  nl = _common.check_positive_int("num_layers", num_layers)
  if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or (
      not 0 <= layer < nl):
    raise ValueError(f"`layer` must be an int in [0, {nl}), got {layer!r}.")
  scales = tuple(float(s) for s in scales)
  if not scales or any(s <= 0 for s in scales):
    raise ValueError(f"`scales` must be positive, got {scales}.")
  ls = scales[_groups(nl, len(scales))[layer]] if nl > 1 else 1.0
  hs = [scales[g] for g in _groups(n, len(scales))] if n > 1 else [1.0]
  return tuple(max(1, int(round(w * ls * s))) for s in hs)


def _windows(window_sizes, n, is_causal):
  try:
    ws = list(window_sizes)
  except TypeError:
    raise ValueError(
        f"`window_sizes` must be a sequence of {n} windows (int or (left, "
        f"right)), one per query head; got {window_sizes!r}.") from None
  if len(ws) != n:
    raise ValueError(
        f"`window_sizes` must have one window per query head ({n}), got "
        f"{len(ws)}.")
  out = []
  for w in ws:
    lr = normalize_window(w, "window_sizes")
    if lr is None:
      raise ValueError("`window_sizes` entries must be ints or (left, right) "
                       "pairs, got None.")
    left, right = lr
    out.append((left, 0 if is_causal else right))
  return out


_OP = Op("mswa_attention")


@_OP.register("xla")
def _xla(config, query, key, value, windows, *, is_causal, scale, block_size,
         mask):
  del config
  n, k = query.shape[2], key.shape[2]
  g = n // k
  outs, order = [], []
  for w in sorted(set(windows)):
    idx = np.array([i for i, x in enumerate(windows) if x == w])
    kv_idx = idx // g
    outs.append(sliding_window_attention(
        query[:, :, idx], key[:, :, kv_idx], value[:, :, kv_idx], w,
        is_causal=is_causal, scale=scale, block_size=block_size, mask=mask))
    order.extend(idx.tolist())
  out = jnp.concatenate(outs, axis=2)
  return out[:, :, np.argsort(np.array(order))]


def mswa_attention(query, key, value, window_sizes, *, is_causal: bool = False,
                   scale: Optional[float] = None,
                   block_size: Optional[int] = None, mask=None, bias=None,
                   dropout_rate: float = 0.0, dropout_rng=None,
                   implementation=None):
  """Sliding-window softmax attention with one window per query head.

  Args:
    query: [B, T, N, H] (or unbatched); key: [B, S, K, H]; value [B, S, K, Hv].
    window_sizes: N windows (static), each an int w (keys i-w..i+w) or
      (left, right); causal keeps the left part (keys i-left..i).
    is_causal, scale, block_size, mask: as `sliding_window_attention`.
    implementation: None / 'xla'.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no key in reach are zeros.
  """
  del dropout_rng
  _common.reject("bias", bias, "mswa_attention", "only key blocks near each "
                 "query are gathered; a dense bias would defeat that.")
  _common.reject("dropout_rate", dropout_rate, "mswa_attention",
                 "attention dropout is not implemented for gathered blocks.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  windows = _windows(window_sizes, dims[2], is_causal)
  out = _OP(implementation, query, key, value, windows, is_causal=is_causal,
            scale=scale, block_size=block_size, mask=mask)
  return out[0] if unbatched else out


def mswa_attention_reference(query, key, value, window_sizes, *,
                             is_causal: bool = False,
                             scale: Optional[float] = None, mask=None):
  """Dense softmax attention with a per-head band mask [1, N, T, S]."""
  t, n, s = query.shape[-3], query.shape[-2], key.shape[-3]
  windows = _windows(window_sizes, n, is_causal)
  d = np.arange(t)[:, None] - np.arange(s)[None, :]
  band = np.stack([(d <= l) & (-d <= r) for l, r in windows])[None]
  if query.ndim == 3:
    band = band[0]
  return dot_product_attention(query, key, value,
                               mask=masks_lib.and_masks(jnp.asarray(band),
                                                        mask),
                               scale=scale, is_causal=is_causal,
                               implementation="xla")


class MSWAAttention(MultiHeadAttention):
  """MultiHeadAttention with `mswa_attention(window_sizes)`; by default the
  windows are `mswa_window_sizes(num_heads, base_window, layer=layer,
  num_layers=num_layers)` (a layer stack passes its index)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               window_sizes=None, base_window: int = 64, layer: int = 0,
               num_layers: int = 1, block_size: Optional[int] = None,
               **kwargs):
    if window_sizes is None:
      window_sizes = mswa_window_sizes(num_heads, base_window, layer=layer,
                                       num_layers=num_layers)
    _windows(window_sizes, num_heads, False)
    self.window_sizes = tuple(window_sizes)
    self.block_size = block_size
    super().__init__(num_heads, in_features, *args, attention_fn=self._attend,
                     **kwargs)

  def _attend(self, q, k, v, **kwargs):
    return mswa_attention(q, k, v, self.window_sizes,
                          block_size=self.block_size, **kwargs)
