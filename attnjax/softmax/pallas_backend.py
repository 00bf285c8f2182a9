"""`implementation='pallas'`: pallas_kernels flash attention.

Importing this module registers the backend (the dispatcher imports it on
first use). Serves every AttentionCall except attention dropout and the
options the kernel does not take (`AttentionCall.extensions`); on CPU the
kernels run in Pallas interpret mode (correct but slow: for tests). Tuning:
`implementation=attnjax.softmax.Pallas(block_q=..., interpret=...)`.
"""

from __future__ import annotations

from typing import Optional

from attnjax.softmax._common import AttentionCall
from attnjax.softmax.backends import OP, Pallas

from pallas_kernels.flash import BlockSizes, flash_attention


def block_sizes(config: Optional[Pallas], call: AttentionCall):
  """The kernel's BlockSizes: the config's fields, defaults where None
  (None when the config sets no block size)."""
  fields = ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd")
  if config is None or all(getattr(config, f) is None for f in fields):
    return None
  h, hv = call.query.shape[-1], call.value.shape[-1]
  default = BlockSizes.get_default(head_dim=max(h, hv),
                                   dtype=call.query.dtype)
  return BlockSizes(**{f: getattr(default, f) if getattr(config, f) is None
                       else getattr(config, f) for f in fields})


def pallas_attention(call: AttentionCall, need_lse: bool,
                     config: Optional[Pallas] = None):
  """Backend entry: (out [B, T, N, Hv], lse [B, N, T] float32)."""
  if call.extensions():   # soft cap, sinks, offsets, precision: not in the kernel
    raise NotImplementedError(
        f"implementation='pallas' does not support {', '.join(call.extensions())}; "
        "use implementation='xla' or 'chunked'.")
  if call.dropout_rate > 0.0:
    raise NotImplementedError(
        "implementation='pallas' does not support attention dropout; use "
        "implementation='xla'.")
  res = flash_attention(
      call.query, call.key, call.value, is_causal=call.is_causal,
      scale=call.scale, bias=call.bias, mask=call.mask,
      local_window_size=call.window, q_segment_ids=call.q_segment_ids,
      kv_segment_ids=call.kv_segment_ids,
      block_sizes=block_sizes(config, call),
      interpret=None if config is None else config.interpret,
      return_lse=need_lse)
  return res if need_lse else (res, None)


OP.register("pallas", lambda config, call, need_lse: pallas_attention(
    call, need_lse, config), config_type=Pallas, overwrite=True)
