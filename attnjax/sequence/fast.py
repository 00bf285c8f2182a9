"""FAST: factorizable attention (Gerami, Hoover, Dulepet, Duraiswami 2024,
"FAST: Factorizable attention for speeding up transformers"), "Fastmax".

Each query and key is centred over its head dimension and scaled to unit
norm, x~ = (x - mean(x)) / |x - mean(x)|, so s = q~ . k~ lies in [-1, 1];
the score is the truncated exponential f(s) = sum_{l=0}^{p} s^l / l!
(p = `order`, 1 or 2; both positive on [-1, 1] apart from p = 1 at s = -1),
and the weights are f(s_ij) / sum_j f(s_ij). f factorizes through the
features

    phi(x) = [1, x~]                              (p = 1)
    phi(x) = [1, x~, vec(x~ x~^T) / sqrt(2)]      (p = 2)

so the attention is `linear_attention` with that feature map: O(N D^(p+1))
time, all-to-all interactions kept (nothing is sparsified), causal by the
same chunked scan.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.linear import linear_attention, linear_attention_reference

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}

_EPS = 1e-6


def _check_order(order):
  if isinstance(order, bool) or order not in (1, 2):
    raise ValueError(f"`order` must be 1 or 2 (Taylor terms of exp), got "
                     f"{order!r}.")
  return int(order)


def fastmax_normalize(x):
  """Centre over the last axis and scale to unit norm."""
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(n, _EPS)


def fastmax_features(order: int = 2):
  """The feature map phi with phi(q).phi(k) = sum_{l<=order} s^l / l!."""
  order = _check_order(order)

  def phi(x):
    x = fastmax_normalize(x)
    parts = [jnp.ones(x.shape[:-1] + (1,), x.dtype), x]
    if order == 2:
      d = x.shape[-1]
      parts.append((x[..., :, None] * x[..., None, :]).reshape(
          x.shape[:-1] + (d * d,)) / 2.0 ** 0.5)
    return jnp.concatenate(parts, axis=-1)

  return phi


_OP = Op("fast_attention")


@_OP.register("xla")
def _xla(config, query, key, value, *, order, is_causal, chunk_size, mask,
         bias, dropout_rate):
  del config
  _common.reject("bias", bias, "fast_attention",
                 "an additive bias does not factor through Fastmax.")
  _common.reject("dropout_rate", dropout_rate, "fast_attention",
                 "the attention weights are never materialized.")
  return linear_attention(query, key, value,
                          feature_map=fastmax_features(order),
                          is_causal=is_causal, normalize=True,
                          chunk_size=chunk_size, mask=mask)


def fast_attention(query, key, value, *, order: int = 2,
                   is_causal: bool = False, chunk_size: Optional[int] = None,
                   mask=None, bias=None, dropout_rate: float = 0.0,
                   dropout_rng=None, implementation=None):
  """Fastmax attention (FAST), linear in sequence length.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    order: p, the Taylor order of the score (1 or 2).
    is_causal: causal (chunked scan; `chunk_size` as `linear_attention`).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla'.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no key (or a zero normalizer)
    give zeros.
  """
  del dropout_rng
  order = _check_order(order)
  return _OP(implementation, query, key, value, order=order,
             is_causal=is_causal, chunk_size=chunk_size, mask=mask, bias=bias,
             dropout_rate=dropout_rate)


def fast_attention_reference(query, key, value, *, order: int = 2,
                             is_causal: bool = False, mask=None):
  """Cumulative-sum linear attention with the Fastmax features."""
  return linear_attention_reference(query, key, value,
                                    feature_map=fastmax_features(order),
                                    is_causal=is_causal, mask=mask)


class FASTAttention(MultiHeadAttention):
  """MultiHeadAttention with `fast_attention(order)`."""

  def __init__(self, num_heads: int, in_features: int, *args, order: int = 2,
               chunk_size: Optional[int] = None, **kwargs):
    self.order = _check_order(order)
    self.chunk_size = chunk_size
    super().__init__(num_heads, in_features, *args, attention_fn=self._attend,
                     **kwargs)

  def _attend(self, q, k, v, **kwargs):
    return fast_attention(q, k, v, order=self.order,
                          chunk_size=self.chunk_size, **kwargs)
