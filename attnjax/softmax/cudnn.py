"""Delegates to `jax.nn.dot_product_attention(implementation='cudnn')`.

cuDNN's fused attention serves a subset of calls: GPU only, float16/bfloat16,
no dropout, no explicit segment ids, no log-sum-exp output. Anything else
raises NotImplementedError saying why, so `implementation=None` can fall back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.softmax._common import AttentionCall


def cudnn_attention(call: AttentionCall, *, need_lse: bool = False):
  why = None
  if call.extensions():   # jax.nn.dot_product_attention has none of these
    why = f"jax.nn.dot_product_attention has no {', '.join(call.extensions())}"
  elif jax.default_backend() != "gpu":
    why = f"cuDNN needs a GPU (default backend is {jax.default_backend()!r})"
  elif call.query.dtype not in (jnp.float16, jnp.bfloat16):
    why = f"cuDNN attention needs float16/bfloat16, got {call.query.dtype}"
  elif call.dropout_rate > 0.0:
    why = "jax.nn.dot_product_attention has no dropout"
  elif call.raw_segment_ids:
    why = "explicit segment ids are not supported by the cuDNN delegate"
  elif need_lse:
    why = "jax.nn.dot_product_attention does not return the log-sum-exp"
  elif call.value.shape[-1] != call.query.shape[-1]:
    why = "cuDNN needs value head_dim == query head_dim"
  if why is not None:
    raise NotImplementedError(f"implementation='cudnn' cannot serve this call: {why}.")
  window = call.window
  try:
    out = jax.nn.dot_product_attention(
        call.query, call.key, call.value, bias=call.bias, mask=call.mask,
        scale=call.scale, is_causal=call.is_causal,
        query_seq_lengths=call.query_seq_lengths,
        key_value_seq_lengths=call.key_value_seq_lengths,
        local_window_size=window, implementation="cudnn")
  except (ValueError, NotImplementedError, RuntimeError) as e:
    raise NotImplementedError(
        f"implementation='cudnn' cannot serve this call: {e}") from e
  if call.query_seq_lengths is not None:
    # Rows past a query's length have nothing to attend to: zeros, like every
    # other backend (cuDNN leaves them unspecified).
    t = call.query.shape[1]
    valid = jnp.arange(t)[None, :] < call.query_seq_lengths[:, None]
    out = jnp.where(valid[:, :, None, None], out, jnp.zeros_like(out))
  return out, None
