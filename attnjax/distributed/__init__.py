"""Sequence (context) parallel attention on JAX's own runtime.

* `ring_attention`: key/value shards circulate with `ppermute`; memory per
  device O(T/P); causal load balance by zig-zag or striped placement.
* `ulysses_attention`: `all_to_all` from sequence- to head-sharding, local
  full-sequence attention, `all_to_all` back; needs heads % P == 0.
* `sequence_parallel_attention_fn`: either one wrapped as an
  `attention_fn` for `attnjax.MultiHeadAttention`.

See docs/distributed.md for the communication cost model and when each wins.
"""

from __future__ import annotations

from typing import Optional

from attnjax.distributed.ring import (LAYOUTS, from_ring_layout,
                                      ring_attention, ring_permutation,
                                      to_ring_layout)
from attnjax.distributed.ulysses import ulysses_attention


def sequence_parallel_attention_fn(mesh, axis_name: str, *,
                                   kind: str = "ring",
                                   batch_axis: Optional[str] = None,
                                   **options):
  """An `attention_fn(query, key, value, **kwargs)` for MultiHeadAttention.

  kind='ring' (options: layout, permuted, block_q, block_kv) or 'ulysses'
  (options: implementation). Accepts the keywords `is_causal`, `scale`,
  `local_window_size`, `q_segment_ids` / `kv_segment_ids`; a call
  with a mask, bias or attention dropout raises NotImplementedError
  (sequence-parallel attention does not take them).
  """
  if kind not in ("ring", "ulysses"):
    raise ValueError(f"`kind` must be 'ring' or 'ulysses', got {kind!r}.")
  op = ring_attention if kind == "ring" else ulysses_attention

  def attention_fn(query, key, value, *, is_causal: bool = False,
                   scale: Optional[float] = None, mask=None, bias=None,
                   dropout_rate: float = 0.0, dropout_rng=None, **unused):
    del dropout_rng
    extra = {}
    for name in ("q_segment_ids", "kv_segment_ids",     # packed sequences
                 "local_window_size"):
      if unused.get(name) is not None:
        extra[name] = unused.pop(name)
    if mask is not None or bias is not None or dropout_rate > 0.0 or unused:
      given = [n for n, x in (("mask", mask), ("bias", bias)) if x is not None]
      given += ["dropout_rate"] * (dropout_rate > 0.0) + sorted(unused)
      raise NotImplementedError(
          f"{kind} sequence-parallel attention does not support {given}.")
    return op(query, key, value, mesh=mesh, axis_name=axis_name,
              is_causal=is_causal, scale=scale, batch_axis=batch_axis,
              **options, **extra)

  return attention_fn


__all__ = ["LAYOUTS", "from_ring_layout", "ring_attention", "ring_permutation",
           "sequence_parallel_attention_fn", "to_ring_layout",
           "ulysses_attention"]
