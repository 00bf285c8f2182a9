"""`implementation='triton'`: Triton flash attention through jax-triton.

Importing registers the backend. Serves GPU calls (causal or not, local
windows) without bias, mask, segment ids/lengths or dropout and with a power-of-two head dim
(value head dim equal); anything else raises NotImplementedError saying why,
so `implementation=None` falls through to another backend.
"""

from __future__ import annotations

from typing import Optional

from attnjax.softmax._common import AttentionCall
from attnjax.softmax.backends import OP, Triton

from pallas_kernels import triton_flash


def triton_attention(call: AttentionCall, need_lse: bool,
                     config: Optional[Triton] = None):
  del need_lse
  config = config or Triton()
  # Triton's CPU interpreter needs only triton; the compiled path a GPU.
  if config.interpret:
    why = (None if triton_flash.triton_interpret_available()
           else "interpret=True needs triton, which does not import here")
  else:
    why = triton_flash.why_unavailable()
  if why is None and call.extensions():   # not in the kernel
    why = f"no {', '.join(call.extensions())} (use implementation='chunked')"
  if why is None:
    h, hv = call.query.shape[-1], call.value.shape[-1]
    if call.dropout_rate > 0.0:
      why = "no attention dropout"
    elif call.bias is not None or call.mask is not None:
      why = "no bias or mask (use implementation='pallas')"
    elif call.q_segment_ids is not None:
      why = "no segment ids or sequence lengths (use implementation='pallas')"
    elif h != hv:
      why = f"value head_dim {hv} must equal head_dim {h}"
  if why is not None:
    raise NotImplementedError(
        f"implementation='triton' cannot serve this call: {why}.")
  try:
    return triton_flash.triton_flash_attention(
        call.query, call.key, call.value, is_causal=call.is_causal,
        scale=call.scale, local_window_size=call.window, return_lse=True,
        block_q=config.block_q, block_kv=config.block_kv,
        num_warps=config.num_warps, num_stages=config.num_stages,
        interpret=config.interpret)
  except NotImplementedError as e:
    raise NotImplementedError(
        f"implementation='triton' cannot serve this call: {e}") from e


OP.register("triton", lambda config, call, need_lse: triton_attention(
    call, need_lse, config), config_type=Triton, overwrite=True)
