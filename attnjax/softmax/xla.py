"""The plain XLA softmax attention: materializes [B, N, T, S] logits.

Obviously-correct reference for every other backend, and the fastest choice
for short sequences on CPU. Differentiated by JAX's autodiff; the softmax is
a max-shifted exp whose masked entries are zeroed with jnp.where (never by
multiplying), normalized where the row sum is positive, so fully masked rows
and all -inf bias rows give zeros.

Soft cap, sinks, position offsets and `precision` follow `_common`'s
definitions; a sink joins each row's denominator (`exp(sink - m)`) and
carries no value, so its gradient comes from the same autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.softmax._common import MASK_VALUE, AttentionCall


def _precisions(call: AttentionCall):
  """(q.k precision, p.v precision), each None when not given."""
  return call.precision if call.precision is not None else (None, None)


def soft_cap(logits, cap):
  """cap * tanh(logits / cap); -inf entries (a -inf bias) stay -inf."""
  if cap is None:
    return logits
  capped = cap * jnp.tanh(logits / cap)
  return jnp.where(jnp.isneginf(logits), logits, capped)


def _grouped_logits(call: AttentionCall):
  """float32 logits [B, N, T, S] (scaled, biased, capped) with GQA grouping."""
  b, t, n, s, k, h, _ = call.shape
  g = n // k
  prec = _precisions(call)[0]
  if g == 1:
    logits = jnp.einsum("btnh,bsnh->bnts", call.query, call.key,
                        preferred_element_type=jnp.float32, precision=prec)
  else:
    q = call.query.reshape(b, t, k, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, call.key,
                        preferred_element_type=jnp.float32, precision=prec)
    logits = logits.reshape(b, n, t, s)
  logits = logits.astype(jnp.float32) * call.scale
  if call.bias is not None:
    logits = logits + call.bias.astype(jnp.float32)
  return soft_cap(logits, call.soft_cap)


def attention_probs(call: AttentionCall, need_lse: bool = True):
  """Returns (weights [B, N, T, S] float32, lse [B, N, T] or None).

  Masked logits get a finite large negative (not -inf, so jax.debug_infs
  holds) and masked weights are zeroed with jnp.where; rows whose logits are
  all -inf (an all -inf bias row) or all masked give zero weights.
  """
  logits = _grouped_logits(call)
  mask = call.dense_mask()
  sink = None
  if call.sinks is not None:
    sink = call.sinks.astype(jnp.float32).reshape(1, -1, 1, 1)
  if mask is None and call.bias is None and sink is None:
    # Nothing masked, logits finite: jax.nn.softmax (its custom JVP keeps
    # the backward to one pass).
    weights = jax.nn.softmax(logits, axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1) if need_lse else None
    return weights, lse
  if mask is not None:
    # The lowest finite float32: never above a real logit, so the row max
    # is the max of the row's real logits (however far below -1e30 they
    # lie), or MASK_VALUE itself on a fully masked row.
    m = jnp.max(jnp.where(mask, logits, MASK_VALUE), axis=-1, keepdims=True)
  else:
    m = jnp.max(logits, axis=-1, keepdims=True)
  if sink is not None:
    m = jnp.maximum(m, sink)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  if mask is not None:
    # Masked slots enter the exp as m (exp(0) = 1, then zeroed by the
    # select): whatever their logit holds never reaches an arithmetic op, so
    # MASK_VALUE - m cannot overflow to -inf (jax.debug_infs).
    p = jnp.where(mask, jnp.exp(jnp.where(mask, logits, m) - m), 0.0)
  else:
    p = jnp.exp(logits - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  if sink is not None:
    l = l + jnp.exp(sink - m)   # the sink's mass: in the denominator only
  has = l > 0.0
  weights = p / jnp.where(has, l, 1.0)
  lse = None
  if need_lse:
    lse = jnp.where(has, m + jnp.log(jnp.where(has, l, 1.0)), -jnp.inf)[..., 0]
  return weights, lse


def _masked_softmax_attention(call: AttentionCall, mask):
  """out [B, T, N, Hv] for a masked call without bias, sinks, dropout or lse.

  jax.nn.softmax of the MASK_VALUE-filled logits: the pattern XLA:CPU fuses
  into one pass (max, exp, sum and divide in one YNNPACK fusion, as in
  jax.nn's own attention), where `attention_probs`' select-laden form takes
  five passes over the [T, S] logits and puts a select into the transposing
  copy of the weights before P V (up to 1.8x jax.nn's causal time at
  S = 2048; docs/benchmarks/cpu_perf.md). A
  masked entry gets exp(MASK_VALUE - m) = 0; a fully masked row (uniform
  over its MASK_VALUE entries) is zeroed on the [T, Hv] output, whose select
  also stops its cotangent.
  """
  logits = _grouped_logits(call)
  weights = jax.nn.softmax(jnp.where(mask, logits, MASK_VALUE), axis=-1)
  out = _weighted_values(call, weights)
  live = jnp.any(mask, axis=-1)                     # [B|1, N|1, T]
  live = jnp.moveaxis(live, 1, 2)[..., None]        # [B|1, T, N|1, 1]
  return jnp.where(live, out, 0.0).astype(out.dtype)


def _weighted_values(call: AttentionCall, weights):
  b, t, n, s, k, h, hv = call.shape
  g = n // k
  w = weights.astype(call.value.dtype)
  if g == 1:
    out = jnp.einsum("bnts,bsnd->btnd", w, call.value,
                     preferred_element_type=jnp.float32,
                     precision=_precisions(call)[1])
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", w.reshape(b, k, g, t, s), call.value,
                     preferred_element_type=jnp.float32,
                     precision=_precisions(call)[1])
  return out.reshape(b, t, n, hv).astype(call.query.dtype)


def xla_attention(call: AttentionCall, need_lse: bool = True):
  """Backend entry: returns (out [B, T, N, Hv], lse [B, N, T] or None)."""
  if (not need_lse and call.bias is None and call.sinks is None
      and call.dropout_rate == 0.0):
    mask = call.dense_mask()
    if mask is not None:
      return _masked_softmax_attention(call, mask), None
  weights, lse = attention_probs(call, need_lse)
  if call.dropout_rate > 0.0:
    keep = jax.random.bernoulli(call.dropout_rng, 1.0 - call.dropout_rate,
                                weights.shape)
    weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)
  return _weighted_values(call, weights), lse
