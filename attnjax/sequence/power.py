"""PowerAttention (Chen et al. 2025, "PowerAttention: Exponentially scaling of
receptive fields for effective sparse attention").

A static block-sparse pattern: query block i attends key block j when the
block distance d = i - j is a power of two (1, 2, 4, 8, ...), lies in a
small local window (0 <= d < window_blocks), or j is a sink block
(j < sink_blocks). Each row has O(log(T / block)) blocks, yet stacking L
layers reaches every earlier block within distance 2**L - 1 (any distance is
a sum of distinct powers of two), an exponentially growing receptive field
where a sliding window grows linearly.

`power_layout` builds the bool [nq_blocks, nk_blocks] layout; it is a plain
layout for `block_sparse_attention` (which gathers only its True blocks,
'xla' or 'pallas'), and `power_attention` is that call. Non-causal layouts
use |d| (symmetric pattern).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.sparse import (_block_sizes, block_sparse_attention,
                                     block_sparse_attention_reference)

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}


def _nonneg_int(name, x):
  if (isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer))
      or x < 0):
    raise ValueError(f"`{name}` must be an int >= 0, got {x!r}.")
  return int(x)


def power_layout(num_q_blocks: int, num_k_blocks: Optional[int] = None, *,
                 window_blocks: int = 1, sink_blocks: int = 1,
                 is_causal: bool = True) -> np.ndarray:
  """PowerAttention's block layout, bool [num_q_blocks, num_k_blocks].

  True where d = i - j (|i - j| when not causal) satisfies 0 <= d <
  window_blocks or d is a power of two, or j < sink_blocks; causal layouts
  keep j <= i only.
  """
  nq = _common.check_positive_int("num_q_blocks", num_q_blocks)
  nk = nq if num_k_blocks is None else _common.check_positive_int(
      "num_k_blocks", num_k_blocks)
  w = _nonneg_int("window_blocks", window_blocks)
  sink = _nonneg_int("sink_blocks", sink_blocks)
  d = np.arange(nq)[:, None] - np.arange(nk)[None, :]
  dist = d if is_causal else np.abs(d)
  power = (dist > 0) & ((dist & (dist - 1)) == 0)
  lay = ((dist >= 0) & (dist < w)) | power | (np.arange(nk)[None, :] < sink)
  if is_causal:
    lay &= d >= 0
  return lay


_OP = Op("power_attention")


@_OP.register("xla")
def _xla(config, query, key, value, layout, block_size, *, is_causal, scale,
         mask, bias, dropout_rate):
  del config
  return block_sparse_attention(query, key, value, layout, block_size,
                                is_causal=is_causal, scale=scale, mask=mask,
                                bias=bias, dropout_rate=dropout_rate,
                                implementation="xla")


def _layout_for(query, key, block_size, window_blocks, sink_blocks,
                is_causal):
  bq, bk = _block_sizes(block_size)
  t, s = query.shape[-3], key.shape[-3]
  return power_layout(-(-t // bq), -(-s // bk), window_blocks=window_blocks,
                      sink_blocks=sink_blocks, is_causal=is_causal)


def power_attention(query, key, value, block_size: int = 64, *,
                    window_blocks: int = 1, sink_blocks: int = 1,
                    is_causal: bool = False, scale: Optional[float] = None,
                    mask=None, bias=None, dropout_rate: float = 0.0,
                    dropout_rng=None, implementation=None):
  """Softmax attention over PowerAttention's power-of-two block pattern.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    block_size: int or (block_q, block_k).
    window_blocks, sink_blocks: local window and leading sink blocks.
    is_causal: causal layout and j <= i inside blocks.
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla' (block_sparse_attention's gathered blocks;
      for its Pallas kernel call `block_sparse_attention(..., power_layout(
      ...), implementation='pallas')`).

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  del dropout_rng
  _common.prepare_qkv(query, key, value)
  layout = _layout_for(query, key, block_size, window_blocks, sink_blocks,
                       is_causal)
  return _OP(implementation, query, key, value, layout, block_size,
             is_causal=is_causal, scale=scale, mask=mask, bias=bias,
             dropout_rate=dropout_rate)


def power_attention_reference(query, key, value, block_size: int = 64, *,
                              window_blocks: int = 1, sink_blocks: int = 1,
                              is_causal: bool = False,
                              scale: Optional[float] = None, mask=None):
  """Dense softmax attention with the layout's dense mask."""
  layout = _layout_for(query, key, block_size, window_blocks, sink_blocks,
                       is_causal)
  return block_sparse_attention_reference(query, key, value, layout,
                                          block_size, is_causal=is_causal,
                                          scale=scale, mask=mask)


class PowerAttention(MultiHeadAttention):
  """MultiHeadAttention with `power_attention(block_size, window_blocks,
  sink_blocks)`."""

  def __init__(self, num_heads: int, in_features: int, *args,
               block_size: int = 64, window_blocks: int = 1,
               sink_blocks: int = 1, **kwargs):
    _block_sizes(block_size)
    _nonneg_int("window_blocks", window_blocks)
    _nonneg_int("sink_blocks", sink_blocks)
    self.block_size = block_size
    self.window_blocks = window_blocks
    self.sink_blocks = sink_blocks
    super().__init__(num_heads, in_features, *args, attention_fn=self._attend,
                     **kwargs)

  def _attend(self, q, k, v, **kwargs):
    return power_attention(q, k, v, self.block_size,
                           window_blocks=self.window_blocks,
                           sink_blocks=self.sink_blocks, **kwargs)
