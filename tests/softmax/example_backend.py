"""Worked example (docs/architecture.md): a new backend for
`dot_product_attention` is this one file.

`row_blocks` computes softmax attention a block of query rows at a time (so
its peak memory is rows x S logits instead of T x S); `RowBlocks(rows=...)`
is its config object. Importing the module registers it: afterwards
`dot_product_attention(..., implementation="row_blocks")`,
`implementation=RowBlocks(rows=16)` and sequences such as
`[RowBlocks(rows=16), "xla"]` work, and `implementation=None` is unchanged
(the automatic order does not list it).

The backend reads an `AttentionCall` (validated, rank-4 inputs: query
[B, T, N, H], key/value [B, S, K, H|Hv]; `dense_mask()` folds mask, causal,
window and segment ids into one boolean array) and returns (out, lse); it
refuses, with NotImplementedError saying why, what it does not implement.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax.numpy as jnp

from attnjax._dispatch import BackendConfig
from attnjax.softmax import OP, AttentionCall

# Which block counts the backend ran with (the test reads it).
BLOCK_COUNTS = []


@dataclasses.dataclass(frozen=True)
class RowBlocks(BackendConfig):
  backend: ClassVar[str] = "row_blocks"
  rows: int = 16            # query rows per block

  def __post_init__(self):
    if not isinstance(self.rows, int) or self.rows <= 0:
      raise ValueError(f"RowBlocks.rows must be a positive int, got "
                       f"{self.rows!r}.")


def _rows(x, start, stop):
  """Rows [start, stop) of a [.., T|1, S|1] array (broadcast dims kept)."""
  return x if x.shape[2] == 1 else x[:, :, start:stop]


def row_blocks_attention(config: Optional[RowBlocks], call: AttentionCall,
                         need_lse: bool):
  config = config or RowBlocks()
  if call.dropout_rate > 0.0 or call.extensions():
    raise NotImplementedError(
        "implementation='row_blocks' has no dropout, soft cap, sinks, "
        "position offsets or precision.")
  b, t, n, s, k, h, hv = call.shape
  g = n // k
  key = jnp.repeat(call.key.astype(jnp.float32), g, axis=2)     # [B,S,N,H]
  value = jnp.repeat(call.value.astype(jnp.float32), g, axis=2)
  mask = call.dense_mask()
  outs, lses = [], []
  starts = range(0, t, config.rows)
  BLOCK_COUNTS.append(len(starts))
  for start in starts:
    stop = min(start + config.rows, t)
    q = call.query[:, start:stop].astype(jnp.float32)
    logits = jnp.einsum("brnh,bsnh->bnrs", q, key) * call.scale
    if call.bias is not None:
      logits = logits + _rows(call.bias, start, stop).astype(jnp.float32)
    ok = (jnp.ones(logits.shape, bool) if mask is None else
          jnp.broadcast_to(_rows(mask, start, stop), logits.shape))
    logits = jnp.where(ok, logits, -1e30)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(ok, jnp.exp(logits - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    has = l > 0
    outs.append(jnp.einsum("bnrs,bsnd->brnd", p / jnp.where(has, l, 1.0),
                           value))
    lses.append(jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)),
                          -jnp.inf)[..., 0])
  out = jnp.concatenate(outs, axis=1).astype(call.query.dtype)
  return out, (jnp.concatenate(lses, axis=2) if need_lse else None)


OP.register("row_blocks", row_blocks_attention, config_type=RowBlocks)
