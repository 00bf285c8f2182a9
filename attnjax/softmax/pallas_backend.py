"""`implementation='pallas'`: pallas_kernels flash attention.

Importing this module registers the backend (the dispatcher imports it on
first use). Serves every AttentionCall except attention dropout; on CPU the
kernels run in Pallas interpret mode (correct but slow: for tests).
"""

from __future__ import annotations

from attnjax.softmax import register_backend
from attnjax.softmax._common import AttentionCall

from pallas_kernels.flash import flash_attention


def pallas_attention(call: AttentionCall, need_lse: bool):
  """Backend entry: (out [B, T, N, Hv], lse [B, N, T] float32)."""
  if call.extensions():   # soft cap, sinks, offsets, precision: not in the kernel
    raise NotImplementedError(
        f"implementation='pallas' does not support {', '.join(call.extensions())}; "
        "use implementation='xla' or 'chunked'.")
  if call.dropout_rate > 0.0:
    raise NotImplementedError(
        "implementation='pallas' does not support attention dropout; use "
        "implementation='xla'.")
  if not need_lse:
    out = flash_attention(
        call.query, call.key, call.value, is_causal=call.is_causal,
        scale=call.scale, bias=call.bias, mask=call.mask,
        local_window_size=call.window, q_segment_ids=call.q_segment_ids,
        kv_segment_ids=call.kv_segment_ids)
    return out, None
  out, lse = flash_attention(
      call.query, call.key, call.value, is_causal=call.is_causal,
      scale=call.scale, bias=call.bias, mask=call.mask,
      local_window_size=call.window, q_segment_ids=call.q_segment_ids,
      kv_segment_ids=call.kv_segment_ids, return_lse=True)
  return out, lse


register_backend("pallas", pallas_attention)
