"""Lightning Attention-2 (Qin et al. 2024) / RetNet retention (Sun et al.
2023): causal linear attention with a per-head exponential decay.

    out_i = scale * sum_{j <= i} lambda_h**(i - j) (q_i . k_j) v_j

The computation is `linear_attention(..., is_causal=True, decay=...)`
(attnjax/sequence/linear.py holds the one tiled implementation: inside a
chunk the decayed masked quadratic form, across chunks a decayed recurrent
state); this module gives it the papers' defaults (identity feature map, no
normalizer, scale 1/sqrt(head_dim) as RetNet's code scales keys), RetNet's
decay schedule `retnet_decays` and an NNX layer.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.sequence.linear import linear_attention, linear_attention_reference

SUPPORT = {
    "noncausal_self": False,
    "causal_self": True,
    "noncausal_cross": False,
    "causal_cross": True,
}


def retnet_decays(num_heads: int) -> np.ndarray:
  """RetNet's per-head decays gamma_h = 1 - 2**(-5 - h), h = 0..N-1."""
  n = _common.check_positive_int("num_heads", num_heads)
  return 1.0 - 2.0 ** (-5.0 - np.arange(n, dtype=np.float64))


def lightning_attention(query, key, value, decay, *, is_causal: bool = True,
                        feature_map="identity", normalize: bool = False,
                        scale: Optional[float] = None,
                        chunk_size: Optional[int] = None, mask=None,
                        bias=None, dropout_rate: float = 0.0,
                        dropout_rng=None, implementation=None):
  """Decayed causal linear attention (Lightning Attention-2 / retention).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    decay: per-head lambda in (0, 1], scalar or [N] (e.g. `retnet_decays(N)`).
    is_causal: must be True (the decay lambda**(i - j) is defined for j <= i);
      False raises NotImplementedError.
    feature_map, normalize: as `linear_attention` (default: identity, no
      normalizer, the papers' form).
    scale: multiplies q . k; default 1/sqrt(H).
    chunk_size: tile length of the intra/inter-block split (default 64).
    mask: key-padding mask broadcastable to [B, 1, 1, S].

  Returns:
    [B, T, N, Hv] in query.dtype.
  """
  if not is_causal:
    raise NotImplementedError(
        "lightning_attention is causal: its decay lambda**(i - j) weights "
        "keys j <= i only; pass is_causal=True.")
  if decay is None:
    raise ValueError("`decay` must be a scalar or [num_heads] array in (0, 1], "
                     "got None.")
  h = query.shape[-1]
  scale = _common.default_scale(scale, h) if not normalize else scale
  return linear_attention(query, key, value, feature_map=feature_map,
                          is_causal=True, normalize=normalize, scale=scale,
                          chunk_size=chunk_size, mask=mask, bias=bias,
                          dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                          implementation=implementation, decay=decay)


def lightning_attention_reference(query, key, value, decay, *,
                                  is_causal: bool = True,
                                  feature_map="identity",
                                  normalize: bool = False,
                                  scale: Optional[float] = None, mask=None):
  """Plain-jnp explicit decayed causal sum (materializes [T, S])."""
  if not is_causal:
    raise NotImplementedError("lightning_attention is causal.")
  h = query.shape[-1]
  scale = _common.default_scale(scale, h) if not normalize else scale
  return linear_attention_reference(query, key, value, feature_map=feature_map,
                                    is_causal=True, normalize=normalize,
                                    scale=scale, mask=mask, decay=decay)


class LightningAttention(MultiHeadAttention):
  """MultiHeadAttention with `lightning_attention` (per-head decays fixed at
  construction, default `retnet_decays(num_heads)`). Causal: call it with
  is_causal=True."""

  def __init__(self, num_heads: int, in_features: int, *args, decay=None,
               chunk_size: Optional[int] = None, feature_map="identity",
               normalize: bool = False, **kwargs):
    decay = retnet_decays(num_heads) if decay is None else decay
    d = np.asarray(decay, np.float64)
    if d.ndim > 1 or (d.ndim == 1 and d.shape[0] != num_heads) or not np.all(
        (d > 0) & (d <= 1)):
      raise ValueError(
          f"`decay` must be a scalar or [{num_heads}] array in (0, 1], got "
          f"{d!r}.")
    self.decay = tuple(np.broadcast_to(d, (num_heads,)).tolist())
    self.chunk_size = chunk_size
    self.feature_map = feature_map
    self.normalize = normalize
    super().__init__(num_heads, in_features, *args, **kwargs)

  def attend(self, q, k, v, is_causal: bool = False, **kwargs):
    return lightning_attention(q, k, v, jnp.asarray(self.decay, jnp.float32),
                               is_causal=is_causal,
                               feature_map=self.feature_map,
                               normalize=self.normalize,
                               chunk_size=self.chunk_size, **kwargs)
