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

`implementation=` also takes a config object carrying a backend's tuning,
`Xla()`, `Chunked(block_q, block_kv)`, `Cudnn()`, `Pallas(block_q, block_kv,
block_q_bwd, block_kv_bwd, interpret)`, `Triton(block_q, block_kv,
num_warps, num_stages, interpret)`, or a sequence of names/configs tried in
order (e.g. `[Pallas(block_q=64), 'xla']`). A backend that cannot serve a
call raises NotImplementedError saying why; the next candidate is tried and,
when none serves, one NotImplementedError lists every refusal. This is the
one dispatch of every attnjax op (`attnjax._dispatch`); `OP` is this op's.

Backends are `fn(config, call: AttentionCall, need_lse) -> (out, lse)`
registered with `OP.register` (see `attnjax.softmax.backends`), or
`fn(call, need_lse)` registered with `register_backend`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax._checks import as_array
from attnjax.softmax import _auto  # noqa: F401  (tests patch its table)
from attnjax.softmax._common import (AttentionCall, empty_result, prepare,
                                     restore_batch)
from attnjax.softmax.chunked import chunked_attention
from attnjax.softmax.cudnn import cudnn_attention
from attnjax.softmax.merge import merge_attentions
from attnjax.softmax.xla import attention_probs, xla_attention
from attnjax.softmax.backends import (OP, Chunked, Cudnn, Pallas, Triton,
                                      Xla)

def register_backend(name: str, fn: Callable, *,
                     overwrite: bool = False) -> None:
  """Registers `fn(call, need_lse) -> (out, lse)` as `implementation=name`.

  `call` is an `AttentionCall`; `fn` returns out [B, T, N, Hv] and, when
  `need_lse`, lse [B, N, T] float32 (a backend returning None then is
  treated as refusing the call), and raises NotImplementedError for calls it
  cannot serve. An existing name raises ValueError unless `overwrite=True`.
  Backends that take a config object register on `attnjax.softmax.OP`
  directly (`OP.register(name, fn(config, call, need_lse), config_type=...)`).
  """
  def backend(config, call, need_lse):
    del config
    out, lse = fn(call, need_lse)
    if need_lse and lse is None:
      raise NotImplementedError(
          f"implementation={name!r} does not return the log-sum-exp.")
    return out, lse

  OP.register(name, backend, overwrite=overwrite)


def available_implementations():
  """Names accepted by `implementation=` (some may still refuse a call)."""
  return OP.names()


def _run(call: AttentionCall, implementation, need_lse: bool):
  OP.resolve(implementation)           # unknown names raise first
  if 0 in call.shape:
    # Batch 0, zero-length sequences, no heads, empty head dims: the result
    # is fully determined (zeros, lse -inf); every backend agrees by
    # construction and no kernel sees an empty grid.
    return empty_result(call, need_lse)
  return OP(implementation, call, need_lse)


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
                          logits_soft_cap: Optional[float] = None,
                          sinks=None,
                          causal_alignment: str = "top_left",
                          q_offset=None,
                          kv_offset=None,
                          precision=None,
                          implementation: Optional[str] = None):
  """Scaled dot-product attention.

  Args:
    query: [B, T, N, H] (or [T, N, H], or [..., T, N, H]: any number of
      leading batch dims, shared by key/value).
    key: [B, S, K, H] with N % K == 0 (GQA/MQA).
    value: [B, S, K, Hv].
    bias: float, broadcastable to [B, N, T, S]; added to the scaled logits.
    mask: bool, broadcastable to [B, N, T, S]; True = attend.
    scale: logit scale; default 1/sqrt(H).
    is_causal: query i sees keys j <= i (top-left aligned, as jax.nn; see
      `causal_alignment` and the offsets).
    local_window_size: int w or (left, right): query i sees keys in
      [i - left, i + right] (shifted like `is_causal`).
    query_seq_lengths, key_value_seq_lengths: int [B]; positions at or past
      the length are padding.
    q_segment_ids, kv_segment_ids: int [B, T] / [B, S]; attend only within
      equal ids (packed sequences).
    dropout_rate, dropout_rng: attention-weight dropout (training only).
    logits_soft_cap: c > 0: logits become c * tanh(logits / c), applied to
      `scale * q.k + bias` before masking (tokamax's order; Gemma-2 has no
      bias). A -inf bias entry stays -inf.
    sinks: float [N]: one learned sink logit per query head that joins the
      softmax denominator and carries no value (gpt-oss, attention-sink
      papers): weights are exp(l_j) / (exp(sink) + sum_k exp(l_k)). Not
      scaled or capped. Differentiable. Rows with nothing to attend to
      still give zeros (their lse is then the sink).
    causal_alignment: 'top_left' (query i at key position i, as jax.nn) or
      'bottom_right' (query i at key position i + S - T: the last query
      sees the last key, for decoding with T < S).
    q_offset, kv_offset: int, or int arrays broadcastable to the batch
      shape: absolute positions of the first query / first key (e.g. a
      decode step's position and a cache chunk's start). Causal masking
      and local windows use query position i + q_offset and key position
      j + kv_offset (one rule: key j is in reach of query i iff
      i + shift - left <= j <= i + shift + right with shift = q_offset -
      kv_offset, or S - T for 'bottom_right'). Not with 'bottom_right'.
    precision: a `jax.lax.Precision` (or its name) for both matmuls, or a
      (q.k, p.v) pair; passed to the matmuls of 'xla' and 'chunked'.
    implementation: see the module docstring. Backends without an option
      above raise NotImplementedError (the Pallas/Triton kernels and cuDNN
      take none of soft cap, sinks, offsets, precision).

  Returns:
    [B, T, N, Hv] in query.dtype (with query's leading dims); rows with
    nothing to attend to are zero.

  Masked slots: key/value positions that a masking component rules out for
  every query (past `key_value_seq_lengths`, an all-False `mask` column, a
  kv segment id no query has, right of every query's causal/window reach)
  are zeroed before any backend runs, so NaN/Inf there reach no output and
  no gradient (their gradients are 0). Empty inputs (batch 0, zero-length
  sequences) return zeros of the right shape. Integer arguments accept
  NumPy/JAX integer scalars; Python lists are converted to arrays.
  """
  call, batch_shape = prepare(
      query, key, value, bias, mask, scale=scale, is_causal=is_causal,
      local_window_size=local_window_size,
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      dropout_rate=dropout_rate, dropout_rng=dropout_rng,
      logits_soft_cap=logits_soft_cap, sinks=sinks,
      causal_alignment=causal_alignment, q_offset=q_offset,
      kv_offset=kv_offset, precision=precision)
  out, _ = _run(call, implementation, need_lse=False)
  return restore_batch(out, batch_shape)


def dot_product_attention_with_lse(query, key, value, bias=None, mask=None, *,
                                   implementation: Optional[str] = None,
                                   lse_layout: str = "BNT",
                                   lse_gradient: bool = True,
                                   **kwargs):
  """As `dot_product_attention`, also returning the log-sum-exp.

  Returns (out [B, T, N, Hv], lse) with lse float32 (-inf on rows with
  nothing to attend to; with `sinks`, the sink is part of the sum):

    lse_layout='BNT' (default): lse [B, N, T] ([N, T] unbatched).
    lse_layout='BTN': lse [B, T, N] ([T, N]), the layout of
      `jax.nn.dot_product_attention(..., return_residual=True)`.
    lse_gradient=True (default): the lse is differentiable (gradients flow
      from it into q, k, bias, sinks), as `merge_attentions` needs to be
      differentiated through. False: `jax.lax.stop_gradient(lse)`, as the
      residual of jax.nn (which is also cast to the key dtype; ours stays
      float32).

  Leading batch dims of [..., T, N, H] inputs are kept: lse [..., N, T] or
  [..., T, N]. Useful to merge partial attentions (ring/split-KV) with
  `merge_attentions`.
  """
  _check_lse_options(lse_layout, lse_gradient)
  call, batch_shape = prepare(query, key, value, bias, mask, **kwargs)
  out, lse = _run(call, implementation, need_lse=True)
  lse = _lse_options(lse, lse_layout, lse_gradient)
  return restore_batch(out, batch_shape), restore_batch(lse, batch_shape)


def _check_lse_options(lse_layout, lse_gradient):
  if lse_layout not in ("BNT", "BTN"):
    raise ValueError(
        f"`lse_layout` must be 'BNT' or 'BTN', got {lse_layout!r}.")
  if not isinstance(lse_gradient, (bool, np.bool_)):
    raise ValueError(f"`lse_gradient` must be a bool, got {lse_gradient!r}.")


def _lse_options(lse, lse_layout, lse_gradient):
  """[B, N, T] lse -> the layout / gradient asked for."""
  if not lse_gradient:
    lse = jax.lax.stop_gradient(lse)
  return jnp.swapaxes(lse, 1, 2) if lse_layout == "BTN" else lse


def chunked_dot_product_attention(query, key, value, bias=None, mask=None, *,
                                  block_q: Optional[int] = None,
                                  block_kv: Optional[int] = None,
                                  return_lse: bool = False,
                                  lse_layout: str = "BNT",
                                  lse_gradient: bool = True, **kwargs):
  """Alias of `dot_product_attention(..., implementation=Chunked(block_q,
  block_kv))` (with `return_lse`, of `dot_product_attention_with_lse`).

  Same arguments as `dot_product_attention`; `block_q` / `block_kv` set the
  query and key/value block lengths (defaults per platform, see
  `attnjax.softmax.chunked.default_blocks`; capped at the sequence
  lengths). Peak memory grows with block_q * block_kv, not T * S.
  `return_lse=True` also returns the lse, shaped and differentiable as
  `lse_layout` / `lse_gradient` say (see `dot_product_attention_with_lse`).
  """
  config = Chunked(block_q=block_q, block_kv=block_kv)
  if return_lse:
    return dot_product_attention_with_lse(
        query, key, value, bias, mask, implementation=config,
        lse_layout=lse_layout, lse_gradient=lse_gradient, **kwargs)
  _check_lse_options(lse_layout, lse_gradient)
  return dot_product_attention(query, key, value, bias, mask,
                               implementation=config, **kwargs)


def attention_weights(query, key, bias=None, mask=None, **kwargs):
  """Softmax attention probabilities [B, N, T, S] (float32), for analysis.

  Accepts the masking keywords of `dot_product_attention` (scale, is_causal,
  local_window_size, seq lengths, segment ids, causal_alignment, offsets) and
  logits_soft_cap / sinks (with sinks a row sums to 1 minus the sink's
  share). Rows with nothing to attend to are all-zero.
  """
  key = as_array("key", key)
  value = jnp.zeros(jnp.shape(key)[:-1] + (1,), getattr(key, "dtype",
                                                          jnp.float32))
  call, batch_shape = prepare(query, key, value, bias, mask, **kwargs)
  weights, _ = attention_probs(call, need_lse=False)
  return restore_batch(weights, batch_shape)


__all__ = [
    "OP", "Chunked", "Cudnn", "Pallas", "Triton", "Xla",
    "AttentionCall", "attention_weights", "available_implementations",
    "chunked_attention", "chunked_dot_product_attention",
    "dot_product_attention",
    "dot_product_attention_with_lse", "merge_attentions", "register_backend",
    "xla_attention",
]
