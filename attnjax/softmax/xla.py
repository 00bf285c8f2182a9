"""The plain XLA softmax attention: materializes [B, N, T, S] logits.

Obviously-correct reference for every other backend, and the fastest choice
for short sequences on CPU. Differentiated by JAX's autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.softmax._common import AttentionCall, masked_softmax_stats


def _grouped_logits(call: AttentionCall):
  """float32 logits [B, N, T, S] (scaled, biased) with GQA grouping."""
  b, t, n, s, k, h, _ = call.shape
  g = n // k
  q = call.query.reshape(b, t, k, g, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, call.key,
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(b, n, t, s).astype(jnp.float32) * call.scale
  if call.bias is not None:
    logits = logits + call.bias.astype(jnp.float32)
  return logits


def attention_probs(call: AttentionCall):
  """Returns (weights [B, N, T, S] float32, lse [B, N, T])."""
  logits = _grouped_logits(call)
  p, l, lse = masked_softmax_stats(logits, call.dense_mask())
  weights = p / jnp.where(l > 0, l, 1.0)
  return weights, lse


def xla_attention(call: AttentionCall):
  """Backend entry: returns (out [B, T, N, Hv], lse [B, N, T])."""
  b, t, n, s, k, h, hv = call.shape
  g = n // k
  weights, lse = attention_probs(call)
  if call.dropout_rate > 0.0:
    keep = jax.random.bernoulli(call.dropout_rng, 1.0 - call.dropout_rate,
                                weights.shape)
    weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)
  w = weights.reshape(b, k, g, t, s).astype(call.value.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", w, call.value,
                   preferred_element_type=jnp.float32)
  out = out.reshape(b, t, n, hv).astype(call.query.dtype)
  return out, lse
