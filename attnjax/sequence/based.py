"""Based (Arora et al. 2024, "Simple linear attention language models balance
the recall-throughput tradeoff"; Zoology, Arora et al. 2023).

Linear attention with the second-order Taylor feature map

    phi(x) = [1, x / d**(1/4), vec(x x^T) / (sqrt(2) sqrt(d))]      (d = H)

so that phi(q) . phi(k) = 1 + q.k/sqrt(d) + (q.k)**2 / (2 d), the Taylor
expansion of exp(q.k/sqrt(d)) to second order (always >= 1/2: every
normalizer is positive), plus a small exact softmax sliding window that
restores precise local attention:

    out = linear_attention(phi) + sliding_window_attention(window_size).

The Based architecture interleaves the two as separate layers; here the
two outputs on the same q, k, v are summed, one mixer. Feature size
1 + H + H**2 (Based projects q, k to H = 16 first: 273 features). Both parts
are linear in sequence length (the window fixed).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax._dispatch import Op
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.linear import linear_attention, linear_attention_reference
from attnjax.sequence.sparse import (sliding_window_attention,
                                     sliding_window_attention_reference)

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}

DEFAULT_WINDOW = 64


def taylor_feature_map(x):
  """[..., d] -> [..., 1 + d + d*d]: phi(q).phi(k) = 1 + s + s**2/2 with
  s = q.k/sqrt(d)."""
  d = x.shape[-1]
  one = jnp.ones(x.shape[:-1] + (1,), x.dtype)
  lin = x / d ** 0.25
  quad = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (d * d,))
  quad = quad / (2.0 ** 0.5 * d ** 0.5)
  return jnp.concatenate([one, lin, quad], axis=-1)


def _check_window(window_size):
  if window_size is None:
    raise ValueError("`window_size` must be an int >= 0 or (left, right), got "
                     "None.")


_OP = Op("based_attention")


@_OP.register("xla")
def _xla(config, query, key, value, *, window_size, is_causal, scale,
         chunk_size, block_size, mask, bias, dropout_rate):
  del config
  _common.reject("bias", bias, "based_attention",
                 "an additive bias does not factor through the Taylor map.")
  _common.reject("dropout_rate", dropout_rate, "based_attention",
                 "the linear part never materializes attention weights.")
  lin = linear_attention(query, key, value, feature_map=taylor_feature_map,
                         is_causal=is_causal, normalize=True,
                         chunk_size=chunk_size, mask=mask)
  if window_size == 0:
    return lin
  loc = sliding_window_attention(query, key, value, window_size,
                                 is_causal=is_causal, scale=scale,
                                 block_size=block_size, mask=mask)
  return (lin.astype(jnp.float32) + loc.astype(jnp.float32)).astype(
      query.dtype)


def based_attention(query, key, value, *, window_size=DEFAULT_WINDOW,
                    is_causal: bool = False, scale: Optional[float] = None,
                    chunk_size: Optional[int] = None,
                    block_size: Optional[int] = None, mask=None, bias=None,
                    dropout_rate: float = 0.0, dropout_rng=None,
                    implementation=None):
  """Based: Taylor linear attention + exact sliding-window softmax, summed.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    window_size: the exact window, int w (keys i-w..i+w; causal: i-w..i) or
      (left, right) as `sliding_window_attention`; 0 = Taylor part only.
    is_causal: causal linear part and window.
    scale: the window's softmax scale (default 1/sqrt(H)); the Taylor part
      always uses 1/sqrt(H).
    chunk_size: chunk of the causal linear part; block_size: the window's.
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla'.

  Returns:
    [B, T, N, Hv] in query.dtype; rows with no key are zeros.
  """
  del dropout_rng
  _check_window(window_size)
  return _OP(implementation, query, key, value, window_size=window_size,
             is_causal=is_causal, scale=scale, chunk_size=chunk_size,
             block_size=block_size, mask=mask, bias=bias,
             dropout_rate=dropout_rate)


def based_attention_reference(query, key, value, *, window_size=DEFAULT_WINDOW,
                              is_causal: bool = False,
                              scale: Optional[float] = None, mask=None):
  """Cumulative-sum Taylor linear attention + dense banded softmax."""
  _check_window(window_size)
  lin = linear_attention_reference(query, key, value,
                                   feature_map=taylor_feature_map,
                                   is_causal=is_causal, mask=mask)
  if window_size == 0:
    return lin
  loc = sliding_window_attention_reference(query, key, value, window_size,
                                           is_causal=is_causal, scale=scale,
                                           mask=mask)
  return (lin.astype(jnp.float32) + loc.astype(jnp.float32)).astype(
      query.dtype)


class BasedAttention(MultiHeadAttention):
  """MultiHeadAttention with `based_attention(window_size)` (use a small
  head_dim, e.g. 16: the Taylor features grow as head_dim**2)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               window_size=DEFAULT_WINDOW, chunk_size: Optional[int] = None,
               **kwargs):
    _check_window(window_size)
    self.window_size = window_size
    self.chunk_size = chunk_size
    super().__init__(num_heads, in_features, *args, **kwargs)

  def attend(self, q, k, v, **kwargs):
    return based_attention(q, k, v, window_size=self.window_size,
                           chunk_size=self.chunk_size, **kwargs)
