"""Softmax (dot-product) attention with pluggable backends.

`dot_product_attention` mirrors `jax.nn.dot_product_attention`: query
`[B, T, N, H]`, key/value `[B, S, K, H]` (unbatched rank-3 inputs also work),
GQA/MQA when N % K == 0, boolean masks with True = attend, softmax in float32,
output in the query dtype, zeros for query rows with nothing to attend to.

Backends (`implementation=`):
  'xla'      plain reference; materializes the [B, N, T, S] logits.
  'chunked'  online softmax over blocks with a recomputing custom_vjp: memory
             linear in sequence length; pure JAX, runs everywhere.
  'cudnn'    jax.nn.dot_product_attention(implementation='cudnn'), GPU only.
  'pallas'   pallas_kernels flash attention (GPU/TPU; CPU in interpret mode).
  'triton'   Triton kernels through jax-triton (GPU only).
  None       the best backend able to serve the call on this platform.

A backend that cannot serve a call raises NotImplementedError saying why.
Backends are functions `fn(call: AttentionCall, need_lse: bool) -> (out, lse)`
registered with `register_backend`.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

from attnjax._checks import as_array
from attnjax.softmax import _auto
from attnjax.softmax._common import AttentionCall, empty_result, prepare
from attnjax.softmax.chunked import chunked_attention
from attnjax.softmax.cudnn import cudnn_attention
from attnjax.softmax.xla import attention_probs, xla_attention

_BACKENDS: Dict[str, Callable] = {}
# Backends whose code lives outside attnjax.softmax: imported on first use;
# importing the module registers the backend.
_LAZY_BACKENDS = {
    "pallas": "attnjax.softmax.pallas_backend",
    "triton": "attnjax.softmax.triton_backend",
}


def register_backend(name: str, fn: Callable) -> None:
  """Registers `fn(call, need_lse) -> (out, lse)` as `implementation=name`."""
  _BACKENDS[name] = fn


register_backend("xla", lambda call, need_lse: xla_attention(call, need_lse))
register_backend("chunked", lambda call, need_lse: chunked_attention(
    call, need_lse=need_lse))
register_backend("cudnn", lambda call, need_lse: cudnn_attention(
    call, need_lse=need_lse))


def available_implementations():
  """Names accepted by `implementation=` (some may still refuse a call)."""
  return sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))


def _get_backend(name: str) -> Callable:
  if name not in _BACKENDS and name in _LAZY_BACKENDS:
    try:
      importlib.import_module(_LAZY_BACKENDS[name])
    except ImportError as e:
      raise NotImplementedError(
          f"implementation={name!r} is unavailable here: {e}") from e
  if name not in _BACKENDS:
    raise ValueError(
        f"`implementation` must be one of {available_implementations()} or "
        f"None, got {name!r}.")
  return _BACKENDS[name]


def _auto_order(call: AttentionCall):
  # 'xla' vs 'chunked' first: the measured per-platform crossover rule.
  fallback = _auto.call_order(call)
  # The Pallas and Triton kernels are chosen only when asked for by name:
  # they are verified in interpret mode on CPU but have not yet been run on a
  # GPU/TPU in CI, so the automatic path uses the backends that have been.
  if jax.default_backend() == "gpu":
    return ["cudnn"] + fallback
  return fallback


def _run(call: AttentionCall, implementation: Optional[str], need_lse: bool):
  if implementation is not None:
    backend = _get_backend(implementation)   # unknown names raise first
  if 0 in call.shape:
    # Batch 0, zero-length sequences, no heads, empty head dims: the result
    # is fully determined (zeros, lse -inf); every backend agrees by
    # construction and no kernel sees an empty grid.
    return empty_result(call, need_lse)
  if implementation is not None:
    out, lse = backend(call, need_lse)
    if need_lse and lse is None:
      raise NotImplementedError(
          f"implementation={implementation!r} does not return the log-sum-exp.")
    return out, lse
  reasons = []
  for name in _auto_order(call):
    try:
      out, lse = _get_backend(name)(call, need_lse)
    except NotImplementedError as e:
      reasons.append(str(e))
      continue
    if need_lse and lse is None:
      continue
    return out, lse
  raise NotImplementedError("no backend can serve this call: " +
                            "; ".join(reasons))


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          scale: Optional[float] = None,
                          is_causal: bool = False,
                          local_window_size=None,
                          query_seq_lengths=None,
                          key_value_seq_lengths=None,
                          q_segment_ids=None,
                          kv_segment_ids=None,
                          dropout_rate: float = 0.0,
                          dropout_rng=None,
                          implementation: Optional[str] = None):
  """Scaled dot-product attention.

  Args:
    query: [B, T, N, H] (or [T, N, H]).
    key: [B, S, K, H] with N % K == 0 (GQA/MQA).
    value: [B, S, K, Hv].
    bias: float, broadcastable to [B, N, T, S]; added to the scaled logits.
    mask: bool, broadcastable to [B, N, T, S]; True = attend.
    scale: logit scale; default 1/sqrt(H).
    is_causal: query i sees keys j <= i (top-left aligned, as jax.nn).
    local_window_size: int w or (left, right): query i sees keys in
      [i - left, i + right].
    query_seq_lengths, key_value_seq_lengths: int [B]; positions at or past
      the length are padding.
    q_segment_ids, kv_segment_ids: int [B, T] / [B, S]; attend only within
      equal ids (packed sequences).
    dropout_rate, dropout_rng: attention-weight dropout (training only).
    implementation: see the module docstring.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with nothing to attend to are zero.

  Masked slots: key/value positions that a masking component rules out for
  every query (past `key_value_seq_lengths`, an all-False `mask` column, a
  kv segment id no query has, right of every query's causal/window reach)
  are zeroed before any backend runs, so NaN/Inf there reach no output and
  no gradient (their gradients are 0). Empty inputs (batch 0, zero-length
  sequences) return zeros of the right shape. Integer arguments accept
  NumPy/JAX integer scalars; Python lists are converted to arrays.
  """
  call, unbatched = prepare(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      local_window_size=local_window_size,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng)
  out, _ = _run(call, implementation, need_lse=False)
  return out[0] if unbatched else out


def dot_product_attention_with_lse(query, key, value, bias=None, mask=None, *,
                                   implementation: Optional[str] = None,
                                   **kwargs):
  """As `dot_product_attention`, also returning the log-sum-exp.

  Returns (out [B, T, N, Hv], lse [B, N, T] float32); lse is -inf on rows with
  nothing to attend to. Useful to merge partial attentions (ring/split-KV).
  """
  call, unbatched = prepare(query, key, value, bias, mask, **kwargs)
  out, lse = _run(call, implementation, need_lse=True)
  return (out[0], lse[0]) if unbatched else (out, lse)


def chunked_dot_product_attention(query, key, value, bias=None, mask=None, *,
                                  block_q: Optional[int] = None,
                                  block_kv: Optional[int] = None,
                                  return_lse: bool = False, **kwargs):
  """`implementation='chunked'` with explicit block sizes.

  Same arguments as `dot_product_attention`; `block_q` / `block_kv` set the
  query and key/value block lengths (defaults per platform, see
  `attnjax.softmax.chunked.default_blocks`; capped at the sequence lengths). Peak memory grows with block_q * block_kv, not T * S.
  """
  call, unbatched = prepare(query, key, value, bias, mask, **kwargs)
  out, lse = chunked_attention(call, block_q=block_q, block_kv=block_kv,
                               need_lse=return_lse)
  if unbatched:
    out, lse = out[0], (None if lse is None else lse[0])
  return (out, lse) if return_lse else out


def attention_weights(query, key, bias=None, mask=None, **kwargs):
  """Softmax attention probabilities [B, N, T, S] (float32), for analysis.

  Accepts the masking keywords of `dot_product_attention` (scale, is_causal,
  local_window_size, seq lengths, segment ids). Rows with nothing to attend to
  are all-zero.
  """
  key = as_array("key", key)
  value = jnp.zeros(jnp.shape(key)[:-1] + (1,), getattr(key, "dtype",
                                                          jnp.float32))
  call, unbatched = prepare(query, key, value, bias, mask, **kwargs)
  weights, _ = attention_probs(call, need_lse=False)
  return weights[0] if unbatched else weights


__all__ = [
    "AttentionCall", "attention_weights", "available_implementations",
    "chunked_attention", "chunked_dot_product_attention",
    "dot_product_attention",
    "dot_product_attention_with_lse", "register_backend", "xla_attention",
]
