"""The plain XLA softmax attention: materializes [B, N, T, S] logits.

Obviously-correct reference for every other backend, and the fastest choice
for short sequences on CPU. Differentiated by JAX's autodiff; the softmax is
`jax.nn.softmax` (whose custom JVP keeps the backward to one pass), with
fully masked rows handled by softmaxing zeros and multiplying by 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.softmax._common import AttentionCall


def _grouped_logits(call: AttentionCall):
  """float32 logits [B, N, T, S] (scaled, biased) with GQA grouping."""
  b, t, n, s, k, h, _ = call.shape
  g = n // k
  if g == 1:
    logits = jnp.einsum("btnh,bsnh->bnts", call.query, call.key,
                        preferred_element_type=jnp.float32)
  else:
    q = call.query.reshape(b, t, k, g, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, call.key,
                        preferred_element_type=jnp.float32)
    logits = logits.reshape(b, n, t, s)
  logits = logits.astype(jnp.float32) * call.scale
  if call.bias is not None:
    logits = logits + call.bias.astype(jnp.float32)
  return logits


def attention_probs(call: AttentionCall, need_lse: bool = True):
  """Returns (weights [B, N, T, S] float32, lse [B, N, T] or None)."""
  logits = _grouped_logits(call)
  mask = call.dense_mask()
  row_ok = None
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
    row_ok = jnp.any(mask, axis=-1, keepdims=True)
    # Rows with nothing to attend to: softmax of zeros (finite), then x 0.
    logits = jnp.where(row_ok, logits, 0.0)
  weights = jax.nn.softmax(logits, axis=-1)
  lse = None
  if need_lse:
    lse = jax.nn.logsumexp(logits, axis=-1)
  if row_ok is not None:
    weights = weights * row_ok
    if need_lse:
      lse = jnp.where(row_ok[..., 0], lse, -jnp.inf)
  return weights, lse


def xla_attention(call: AttentionCall, need_lse: bool = True):
  """Backend entry: returns (out [B, T, N, Hv], lse [B, N, T] or None)."""
  b, t, n, s, k, h, hv = call.shape
  g = n // k
  weights, lse = attention_probs(call, need_lse)
  if call.dropout_rate > 0.0:
    keep = jax.random.bernoulli(call.dropout_rng, 1.0 - call.dropout_rate,
                                weights.shape)
    weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)
  w = weights.astype(call.value.dtype)
  if g == 1:
    out = jnp.einsum("bnts,bsnd->btnd", w, call.value,
                     preferred_element_type=jnp.float32)
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", w.reshape(b, k, g, t, s), call.value,
                     preferred_element_type=jnp.float32)
  out = out.reshape(b, t, n, hv).astype(call.query.dtype)
  return out, lse
