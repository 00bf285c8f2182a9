"""CrossViT cross-attention fusion (Chen et al. 2021).

One branch's CLS token queries the other branch's tokens: with x = [cls_a';
patches_b] (cls_a' = cls_a projected to branch b's width), the query is
x[:, :1] and keys/values are all of x. `cls_cross_attention` is that
attention on per-head arrays; `CrossViTAttention` is CrossViT's
CrossAttention module; `CrossViTFusion` is the fusion of one branch
(project CLS, cross-attend with a pre-norm residual, project back), as in
CrossViT's MultiScaleBlock with one cross-attention layer and no MLP.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._checks import check_rank
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, heads_and_scale,
                                     masked_softmax, repeat_kv)

__all__ = ["cls_cross_attention", "cls_cross_attention_reference",
           "CrossViTAttention", "CrossViTFusion"]


def cls_cross_attention(query, key, value, *, scale: Optional[float] = None):
  """query [B, T, N, D] (T = 1 for CrossViT) over key/value [B, S, K, D]."""
  _, n, _ = check_spatial_qkv(query, key, value, spatial_dims=(1,),
                              same_spatial=False)
  scale = default_scale(scale, query.shape[-1])
  k, v = repeat_kv(key, n), repeat_kv(value, n)
  logits = jnp.einsum("btnh,bsnh->bnts", query, k,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits)
  return jnp.einsum("bnts,bsnh->btnh", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(query.dtype)


def cls_cross_attention_reference(query, key, value, *, scale=None):
  """Per-query loop with jax.nn.softmax (oracle)."""
  _, n, kh = check_spatial_qkv(query, key, value, spatial_dims=(1,),
                               same_spatial=False)
  scale = default_scale(scale, query.shape[-1])
  outs = []
  for t in range(query.shape[1]):
    q = query[:, t].astype(jnp.float32)                            # [B, N, D]
    k = jnp.repeat(key, n // kh, 2).astype(jnp.float32)
    v = jnp.repeat(value, n // kh, 2).astype(jnp.float32)
    w = jnp.exp(jnp.einsum("bnh,bsnh->bns", q, k) * scale)
    w = w / w.sum(-1, keepdims=True)
    outs.append(jnp.einsum("bns,bsnh->bnh", w, v))
  return jnp.stack(outs, 1).astype(query.dtype)



def _check_tokens(name, x, dim):
  """[batch, 1 + tokens, dim] with a CLS token first."""
  if x.shape[-1] != dim or x.shape[1] < 1:
    raise ValueError(
        f"`{name}` must have shape [batch, 1 + tokens, dim={dim}] (CLS token "
        f"first), got {tuple(x.shape)}.")

class CrossViTAttention(HeadGated):
  """CrossViT CrossAttention on tokens x [B, 1 + S, dim] -> [B, 1, dim].

  Parameters as CrossViT: `wq`, `wk`, `wv` Linear(dim, dim, bias=qkv_bias)
  and `proj` Linear(dim, dim).
  """

  def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False,
               qk_scale: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wq = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.wk = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.wv = nnx.Linear(dim, dim, use_bias=qkv_bias, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)

  def __call__(self, x):
    check_rank("x", x, (3,))
    _check_tokens("x", x, self.wq.in_features)
    b, s, c = x.shape
    n, d = self.num_heads, self.head_dim
    q = self.wq(x[:, :1]).reshape(b, 1, n, d)
    k = self.wk(x).reshape(b, s, n, d)
    v = self.wv(x).reshape(b, s, n, d)
    out = cls_cross_attention(q, k, v, scale=self.scale)
    return self.proj(self.gate_heads(out).reshape(b, 1, c))


class CrossViTFusion(nnx.Module):
  """Fuses branch a's CLS token with branch b's patch tokens.

  `__call__(tokens_a [B, 1 + Sa, dim_a], tokens_b [B, 1 + Sb, dim_b])`
  returns tokens_a with its CLS replaced by
  revert(cls' + attn(norm([cls'; patches_b]))), cls' = project(cls_a).
  project / revert are LayerNorm -> GELU -> Linear (identity when
  dim_a == dim_b), as in CrossViT.
  """

  def __init__(self, dim_a: int, dim_b: int, num_heads_b: int, *,
               qkv_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    for nm, val in (("dim_a", dim_a), ("dim_b", dim_b),
                    ("num_heads_b", num_heads_b)):
      if (isinstance(val, (bool, np.bool_)) or
          not isinstance(val, (int, np.integer)) or val <= 0):
        raise ValueError(f"`{nm}` must be a positive int, got {val!r}.")
    dim_a, dim_b, num_heads_b = int(dim_a), int(dim_b), int(num_heads_b)
    self.dim_a, self.dim_b = dim_a, dim_b
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.same = dim_a == dim_b
    if not self.same:
      self.proj_norm = nnx.LayerNorm(dim_a, **kw)
      self.proj = nnx.Linear(dim_a, dim_b, **kw)
      self.revert_norm = nnx.LayerNorm(dim_b, **kw)
      self.revert = nnx.Linear(dim_b, dim_a, **kw)
    self.norm = nnx.LayerNorm(dim_b, **kw)
    self.attn = CrossViTAttention(dim_b, num_heads_b, qkv_bias=qkv_bias, **kw)

  def __call__(self, tokens_a, tokens_b):
    check_rank("tokens_a", tokens_a, (3,))
    check_rank("tokens_b", tokens_b, (3,))
    _check_tokens("tokens_a", tokens_a, self.dim_a)
    _check_tokens("tokens_b", tokens_b, self.dim_b)
    if tokens_a.shape[0] != tokens_b.shape[0]:
      raise ValueError(
          f"`tokens_a` and `tokens_b` batch sizes differ: shapes "
          f"{tuple(tokens_a.shape)} and {tuple(tokens_b.shape)}.")
    cls = tokens_a[:, :1]
    if not self.same:
      cls = self.proj(nnx.gelu(self.proj_norm(cls)))
    x = jnp.concatenate([cls, tokens_b[:, 1:]], axis=1)
    cls = cls + self.attn(self.norm(x))
    if not self.same:
      cls = self.revert(nnx.gelu(self.revert_norm(cls)))
    return jnp.concatenate([cls, tokens_a[:, 1:]], axis=1)
