"""Lambda layers (Bello 2021, "LambdaNetworks: Modeling Long-Range
Interactions Without Attention").

A lambda layer summarizes the context into linear functions (lambdas) that
it applies to each query instead of forming attention maps. With queries
q_n [heads, k], keys K [m, k], values V [m, v] (multi-query: the heads of a
query share one lambda; here a group of query heads per key/value head,
N % K == 0, the paper is K = 1):

  content lambda:   lambda^c   = softmax_m(K)^T V            [k, v]
  position lambda:  lambda^p_n = sum_m E_{nm}^T V_m  (E_{nm} in R^k)
  output:           y_n = (lambda^c + lambda^p_n)^T q_n      per head

The keys are normalized by a softmax over context positions (per key
channel). Position lambdas use *local relative* embeddings: E_{nm} =
R[m - n + r//2] for |m - n| <= r//2 and 0 otherwise, with R
(`position_embeddings`) of shape [r, k] over a 1D sequence or [r, r, k] over
an image ([B, H, W, ...] inputs, `lambda_attention_2d`); the paper's lambda
convolution: lambda^p is a convolution of each value channel with the
kernel R (zero padding), costing O(n r k v) time and O(n k v) memory (the
global relative form is r = 2 L - 1). Content-only lambdas cost O((n + m) k v).

Patterns: the key softmax spans all context positions, so causal forms are
not supported (as efficient_attention); cross (T != S) works for content
lambdas; position lambdas need the query and context grids to coincide
(self). Masks: key-padding only ([B, 1, 1, S] or [B, H, W] for images);
masked context positions are left out of the key softmax and their values
are zeroed by a select, so they reach neither lambda (nor any gradient); a
query with no context gets zeros (both lambdas vanish). The paper's batch
norm on queries and values and the intra-depth u > 1 are not included.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import masked_softmax
from attnjax.sequence import _common

__all__ = ["LambdaLayer", "SUPPORT", "lambda_attention",
           "lambda_attention_2d", "lambda_attention_2d_reference",
           "lambda_attention_reference"]

SUPPORT = {
    "noncausal_self": True,
    "causal_self": False,
    "noncausal_cross": True,
    "causal_cross": False,
}
_CAUSAL_WHY = (
    "lambda_attention normalizes the keys by a softmax over all context "
    "positions (Bello 2021), so every query's lambda depends on later "
    "positions; there is no causal form.")

_OP = Op("lambda_attention")


def _check_embeddings(e, nd, kdim):
  if e is None:
    return None
  e = jnp.asarray(e)
  want = "[r, key_dim]" if nd == 1 else "[r, r, key_dim]"
  if (e.ndim != nd + 1 or e.shape[-1] != kdim or
      any(r % 2 == 0 for r in e.shape[:-1]) or len(set(e.shape[:-1])) != 1):
    raise ValueError(
        f"`position_embeddings` must be {want} with odd r and key_dim "
        f"{kdim}, got shape {tuple(e.shape)}.")
  return e


def _position_lambdas(v, e, grid):
  """lambda^p [B, P, K, k, v] from values v [B, P, K, Vd] on `grid` and the
  relative embeddings e [r.., k] (a zero-padded convolution per value
  channel)."""
  b, p, kh, vd = v.shape
  nd = len(grid)
  r = e.shape[0]
  x = jnp.moveaxis(v, 1, -1).reshape((b * kh * vd,) + tuple(grid) + (1,))
  rhs = e.astype(jnp.float32).reshape(e.shape[:-1] + (1, e.shape[-1]))
  dn = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
  out = jax.lax.conv_general_dilated(
      x, rhs, window_strides=(1,) * nd, padding=[(r // 2, r // 2)] * nd,
      dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
  out = out.reshape(b, kh, vd, p, e.shape[-1])
  return jnp.transpose(out, (0, 3, 1, 4, 2))          # [B, P, K, k, Vd]


def _content_lambda(k, v, kv_mask):
  ok = None if kv_mask is None else kv_mask[:, :, None, None]
  kbar = masked_softmax(k, ok, axis=1)                 # over positions
  return jnp.einsum("bskc,bskv->bkcv", kbar, v)


def _xla_backend(config, q, k, v, e, kv_mask, grid):
  del config
  b, t, n, kd = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, kd)
  lam = _content_lambda(k, v, kv_mask)
  y = jnp.einsum("btkgc,bkcv->btkgv", qg, lam)
  if e is not None:
    lam_p = _position_lambdas(v, e, grid)
    y = y + jnp.einsum("btkgc,btkcv->btkgv", qg, lam_p)
  return y.reshape(b, t, n, -1)


_OP.register("xla", _xla_backend)


def _prepare(query, key, value, e, mask, is_causal, bias, dropout_rate, grid,
             q_grid, nd, mechanism):
  if is_causal:
    raise NotImplementedError(_CAUSAL_WHY)
  _common.reject("bias", bias, mechanism, "no attention logits are formed.")
  _common.reject("dropout_rate", dropout_rate, mechanism,
                 "no attention weights are formed.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, kh, h, hv = dims
  e = _check_embeddings(e, nd, h)
  if e is not None and tuple(q_grid) != tuple(grid):
    raise ValueError(
        f"position lambdas need the query grid to equal the context grid: "
        f"query positions {tuple(q_grid)}, key positions {tuple(grid)} "
        "(use position_embeddings=None for cross lambdas).")
  return query, key, value, e, dims, unbatched


def _finish(out, query, unbatched):
  out = out.astype(query.dtype)
  return out[0] if unbatched else out


def _kv(key, value, kv_mask):
  f = jnp.float32
  return (_common.zero_masked(key, kv_mask).astype(f),
          _common.zero_masked(value, kv_mask).astype(f))


def lambda_attention(query, key, value, *, position_embeddings=None,
                     mask=None, is_causal: bool = False, scale=None, bias=None,
                     dropout_rate: float = 0.0, dropout_rng=None,
                     implementation=None):
  """Lambda layer over a 1D sequence.

  Args:
    query: [B, T, N, k] (or [T, N, k]); key: [B, S, K, k], N % K == 0;
      value: [B, S, K, v].
    position_embeddings: None (content lambda only) or R [r, k], r odd:
      local relative embeddings (needs T == S).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    is_causal: must be False (NotImplementedError).
    scale, bias, dropout_rate: accepted for MultiHeadAttention; `scale` must
      be None (lambdas have no temperature), bias/dropout None/0.
    implementation: dispatch of op "lambda_attention" (only "xla").

  Returns:
    [B, T, N, v] in query.dtype.
  """
  del dropout_rng
  _common.reject("scale", scale, "lambda_attention",
                 "lambda layers have no logit temperature.")
  q, k, v, e, dims, unbatched = _prepare(
      query, key, value, position_embeddings, mask, is_causal, bias,
      dropout_rate, (jnp.shape(key)[-3],), (jnp.shape(query)[-3],), 1,
      "lambda_attention")
  b, t, n, s, kh, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="lambda_attention",
                                     unbatched=unbatched)
  kf, vf = _kv(k, v, kv_mask)
  out = _OP(implementation, q.astype(jnp.float32), kf, vf, e, kv_mask, (s,))
  return _finish(out, query, unbatched)


def _dense_reference(q, k, v, e, kv_mask, q_pos, k_pos):
  """Plain-jnp lambdas with E_{nm} formed explicitly ([T, S, k])."""
  b, t, n, kd = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, kd)
  ok = None if kv_mask is None else kv_mask[:, :, None, None]
  kbar = masked_softmax(k, ok, axis=1)
  lam = jnp.einsum("bskc,bskv->bkcv", kbar, v)[:, None]         # [B,1,K,k,v]
  if e is not None:
    r = e.shape[0]
    rel = k_pos[None, :, :] - q_pos[:, None, :] + r // 2         # [T, S, nd]
    inside = jnp.all((rel >= 0) & (rel < r), axis=-1)
    idx = tuple(jnp.clip(rel[..., i], 0, r - 1) for i in range(rel.shape[-1]))
    enm = jnp.where(inside[..., None], e.astype(jnp.float32)[idx], 0.0)
    lam = lam + jnp.einsum("tsc,bskv->btkcv", enm, v)
  y = jnp.einsum("btkgc,btkcv->btkgv", qg, jnp.broadcast_to(
      lam, (b, t) + lam.shape[2:]))
  return y.reshape(b, t, n, -1)


def lambda_attention_reference(query, key, value, *, position_embeddings=None,
                               mask=None, is_causal: bool = False):
  """Forms E_{nm} and every lambda^p_n explicitly."""
  q, k, v, e, dims, unbatched = _prepare(
      query, key, value, position_embeddings, mask, is_causal, None, 0.0,
      (jnp.shape(key)[-3],), (jnp.shape(query)[-3],), 1, "lambda_attention")
  b, t, n, s, kh, h, hv = dims
  kv_mask = _common.key_padding_mask(mask, b, n, t, s,
                                     mechanism="lambda_attention",
                                     unbatched=unbatched)
  kf, vf = _kv(k, v, kv_mask)
  out = _dense_reference(q.astype(jnp.float32), kf, vf, e, kv_mask,
                         jnp.arange(t)[:, None], jnp.arange(s)[:, None])
  return _finish(out, query, unbatched)


def _prepare_2d(query, key, value, e, mask):
  for name, x in (("query", query), ("key", key), ("value", value)):
    if jnp.ndim(x) != 5:
      raise ValueError(f"`{name}` must be [batch, height, width, heads, dim], "
                       f"got shape {tuple(jnp.shape(x))}.")
  q_grid, grid = query.shape[1:3], key.shape[1:3]
  flat = lambda x: x.reshape(x.shape[0], -1, *x.shape[3:])
  b = query.shape[0]
  kv_mask = None
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_ or tuple(mask.shape) != (b,) + tuple(grid):
      raise ValueError(f"`mask` must be boolean [batch, height, width] = "
                       f"{[b, *grid]}, got {mask.dtype} {tuple(mask.shape)}.")
    kv_mask = mask.reshape(b, -1)
  q, k, v, e, dims, _ = _prepare(flat(query), flat(key), flat(value), e, None,
                                 False, None, 0.0, grid, q_grid, 2,
                                 "lambda_attention_2d")
  kf, vf = _kv(k, v, kv_mask)
  return q.astype(jnp.float32), kf, vf, e, kv_mask, q_grid, grid


def lambda_attention_2d(query, key, value, *, position_embeddings=None,
                        mask=None, implementation=None):
  """Lambda layer over an image: query [B, H, W, N, k], key [B, H', W', K,
  k], value [B, H', W', K, v]; `position_embeddings` R [r, r, k] (needs
  H, W == H', W'); `mask` bool [B, H', W'] (True = context position
  present). Returns [B, H, W, N, v] in query.dtype."""
  q, k, v, e, kv_mask, q_grid, grid = _prepare_2d(query, key, value,
                                                  position_embeddings, mask)
  out = _OP(implementation, q, k, v, e, kv_mask, tuple(grid))
  return out.reshape(query.shape[:3] + out.shape[2:]).astype(query.dtype)


def lambda_attention_2d_reference(query, key, value, *,
                                  position_embeddings=None, mask=None):
  q, k, v, e, kv_mask, q_grid, grid = _prepare_2d(query, key, value,
                                                  position_embeddings, mask)
  pos = lambda g: jnp.stack(jnp.meshgrid(jnp.arange(g[0]), jnp.arange(g[1]),
                                         indexing="ij"), -1).reshape(-1, 2)
  out = _dense_reference(q, k, v, e, kv_mask, pos(q_grid), pos(grid))
  return out.reshape(query.shape[:3] + out.shape[2:]).astype(query.dtype)


class LambdaLayer(nnx.Module):
  """Lambda layer on [B, T, C] sequences or [B, H, W, C] images.

  q = x W_Q (num_heads x key_dim), keys x W_K and values x W_V (num_kv_heads
  x key_dim / value_dim, value_dim = out_features // num_heads), content
  lambda plus local position lambdas of size `receptive_field` (None:
  content only). Output [.., num_heads * value_dim].
  """

  def __init__(self, in_features: int, out_features: int, *,
               num_heads: int = 4, key_dim: int = 16, num_kv_heads: int = 1,
               receptive_field: Optional[int] = 23, image: bool = False,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    in_features = _common.check_positive_int("in_features", in_features)
    out_features = _common.check_positive_int("out_features", out_features)
    num_heads = _common.check_positive_int("num_heads", num_heads)
    num_kv_heads = _common.check_positive_int("num_kv_heads", num_kv_heads)
    key_dim = _common.check_positive_int("key_dim", key_dim)
    if out_features % num_heads or num_heads % num_kv_heads:
      raise ValueError(
          f"`out_features` ({out_features}) must be divisible by `num_heads` "
          f"({num_heads}) and `num_heads` by `num_kv_heads` ({num_kv_heads}).")
    if receptive_field is not None and (
        _common.check_positive_int("receptive_field", receptive_field) % 2 == 0):
      raise ValueError(f"`receptive_field` must be odd, got {receptive_field}.")
    self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
    self.key_dim, self.value_dim = key_dim, out_features // num_heads
    self.image = image
    lin = lambda o: nnx.Linear(in_features, o, use_bias=False,
                               param_dtype=param_dtype, rngs=rngs)
    self.to_q = lin(num_heads * key_dim)
    self.to_k = lin(num_kv_heads * key_dim)
    self.to_v = lin(num_kv_heads * self.value_dim)
    if receptive_field is None:
      self.position_embeddings = None
    else:
      shape = ((receptive_field,) * (2 if image else 1)) + (key_dim,)
      self.position_embeddings = nnx.Param(nnx.initializers.normal(1.0)(
          rngs.params(), shape, param_dtype))

  def __call__(self, x, *, mask=None):
    want = 4 if self.image else 3
    if x.ndim != want:
      raise ValueError(f"`x` must have rank {want} ("
                       f"{'[B, H, W, C]' if self.image else '[B, T, C]'}), got "
                       f"shape {tuple(x.shape)}.")
    lead = x.shape[:-1]
    q = self.to_q(x).reshape(lead + (self.num_heads, self.key_dim))
    k = self.to_k(x).reshape(lead + (self.num_kv_heads, self.key_dim))
    v = self.to_v(x).reshape(lead + (self.num_kv_heads, self.value_dim))
    e = (None if self.position_embeddings is None
         else self.position_embeddings.value)
    if self.image:
      y = lambda_attention_2d(q, k, v, position_embeddings=e, mask=mask)
    else:
      if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
      y = lambda_attention(q, k, v, position_embeddings=e, mask=mask)
    return y.reshape(lead + (-1,))
