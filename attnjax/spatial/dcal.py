"""Global-local cross-attention (GLCA) of Dual Cross-Attention Learning
(Zhu et al. 2022, "Dual Cross-Attention Learning for Fine-Grained Visual
Categorization and Object Re-Identification").

The `R` tokens with the highest accumulated attention (DCAL: the CLS row of
the attention rollout, `attnjax.analysis.attention_rollout`) are the local
high-response regions; their queries attend to the keys/values of ALL
tokens:

    GLCA(Q^l, K^g, V^g) = softmax(Q^l K^g^T / sqrt(d)) V^g

`global_local_cross_attention(q, k, v, scores, num_local, *, key_mask=None)`
on tokens `[B, T, N, Hd]` (spatial maps: flatten first) returns the outputs
of the selected queries `[B, R, N, Hv]` and their indices `[B, R]` (highest
score first; ties to the lower index). The selection is discrete (no
gradient through `scores`). `key_mask [B, T]` removes keys (masked slots never
reach the output); a query with no valid key returns zeros.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (heads_and_scale, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     masked_softmax, repeat_kv)

__all__ = ["global_local_cross_attention",
           "global_local_cross_attention_reference", "select_local_queries",
           "GlobalLocalCrossAttention", "GLOBAL_LOCAL_CROSS_ATTENTION"]

GLOBAL_LOCAL_CROSS_ATTENTION = Op("spatial.global_local_cross_attention")


def _check(query, key, value, scores, num_local, key_mask):
  check_spatial_qkv(query, key, value, spatial_dims=(1,))
  b, t = query.shape[:2]
  if tuple(scores.shape) != (b, t):
    raise ValueError(f"`scores` must be [batch, tokens]={(b, t)}, got "
                     f"{tuple(scores.shape)}.")
  if not (isinstance(num_local, (int, np.integer)) and 1 <= num_local <= t):
    raise ValueError(f"`num_local` must be an int in [1, {t}], got "
                     f"{num_local!r}.")
  if key_mask is not None and (tuple(key_mask.shape) != (b, t)
                               or key_mask.dtype != jnp.bool_):
    raise ValueError(f"`key_mask` must be bool [batch, tokens]={(b, t)}, got "
                     f"{tuple(key_mask.shape)} {key_mask.dtype}.")


def select_local_queries(scores, num_local: int):
  """Indices [B, R] of the R highest scores (stable: ties to lower index)."""
  s = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  return jnp.argsort(-s, axis=-1, stable=True)[:, :num_local]


def _xla(config, query, key, value, scores, *, num_local, key_mask, scale):
  del config
  n = query.shape[-2]
  idx = select_local_queries(scores, num_local)
  ql = jnp.take_along_axis(query, idx[:, :, None, None], axis=1)
  if key_mask is not None:
    km = key_mask[:, :, None, None]
    key, value = jnp.where(km, key, 0), jnp.where(km, value, 0)
  key, value = repeat_kv(key, n), repeat_kv(value, n)
  logits = jnp.einsum("brnd,btnd->bnrt", ql, key,
                      preferred_element_type=jnp.float32) * scale
  ok = None if key_mask is None else key_mask[:, None, None, :]
  p = masked_softmax(logits, ok)
  out = jnp.einsum("bnrt,btne->brne", p.astype(value.dtype), value,
                   preferred_element_type=jnp.float32).astype(query.dtype)
  return out, idx


GLOBAL_LOCAL_CROSS_ATTENTION.register("xla", _xla)


def global_local_cross_attention(query, key, value, scores, num_local: int, *,
                                 key_mask=None, scale: Optional[float] = None,
                                 implementation=None):
  """DCAL GLCA: top-`num_local` queries by `scores` attend to all keys.

  Args:
    query: [B, T, N, Hd]; key/value [B, T, K, Hd|Hv], N % K == 0.
    scores: [B, T] accumulated attention (e.g. rollout CLS row).
    num_local: R, number of selected queries.
    key_mask: optional bool [B, T].
    implementation: dispatch (`GLOBAL_LOCAL_CROSS_ATTENTION`: 'xla').
  Returns: (out [B, R, N, Hv], idx [B, R]).
  """
  _check(query, key, value, scores, num_local, key_mask)
  return GLOBAL_LOCAL_CROSS_ATTENTION(
      implementation, query, key, value, scores, num_local=int(num_local),
      key_mask=key_mask, scale=default_scale(scale, query.shape[-1]))


def global_local_cross_attention_reference(query, key, value, scores,
                                           num_local: int, *, key_mask=None,
                                           scale: Optional[float] = None):
  """Full self-attention over all tokens (dense), then the rows of the top
  queries picked with NumPy's stable argsort."""
  _check(query, key, value, scores, num_local, key_mask)
  idx = np.argsort(-np.asarray(scores, np.float64), axis=-1,
                   kind="stable")[:, :num_local]
  m = None if key_mask is None else key_mask[:, None, None, :]
  full = dense_attention_reference(query, key, value, m, None,
                                   scale=default_scale(scale, query.shape[-1]))
  return jnp.take_along_axis(full, jnp.asarray(idx)[:, :, None, None],
                             axis=1), jnp.asarray(idx)


class GlobalLocalCrossAttention(HeadGated):
  """DCAL's GLCA block attention on tokens [B, T, C] (shares the shape of a
  ViT attention layer: `qkv` Linear(C, 3C), `proj` Linear(C, C)); the local
  ratio R / T is `local_ratio` (DCAL: 0.1 for classification, 0.3 re-ID).
  Returns (out [B, R, C], idx [B, R])."""

  def __init__(self, dim: int, num_heads: int, *, local_ratio: float = 0.1,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not 0 < local_ratio <= 1:
      raise ValueError(f"`local_ratio` must be in (0, 1], got {local_ratio}.")
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.local_ratio = local_ratio
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x, scores, key_mask=None):
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"`x` must be tokens [B, T, dim={self.dim}], got "
                       f"{tuple(x.shape)}.")
    r = max(1, int(round(self.local_ratio * x.shape[1])))
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    out, idx = global_local_cross_attention(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], scores, r,
        key_mask=key_mask, scale=self.scale)
    out = self.gate_heads(out).reshape(*out.shape[:2], self.dim)
    return self.proj(out), idx
