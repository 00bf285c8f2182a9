"""BOAT bilateral local attention (Yu, Zhao, Li, Yu, "BOAT: Bilateral Local
Attention Vision Transformer", BMVC 2022, arXiv 2201.13027).

BOAT pairs image-space local attention (ISLA: Swin/CSWin windows, here
`window_attention`) with feature-space local attention (FSLA): tokens are
grouped by their features and attention runs inside each group.

Feature-space grouping (the paper's balanced hierarchical clustering, with
the constants of the authors' public code, `ContentAttention` in
mahaoyuHKU/pytorch-boat): per batch entry and head, on the queries,
`L = min{l : ceil(T / 2^l) <= cluster_size}` levels of balanced 2-way
splits. One split of a group (tokens in their current order):

1. centroids c_0, c_1 = l2-normalised means of the group's first
   `n // 2` and last `n - n // 2` tokens;
2. `iters` (2) soft k-means steps on the cosine similarity:
   `a_tj = softmax_j(sharpness * cos(q_t, c_j))` (sharpness 100),
   `c_j = normalize(sum_t a_tj q_t)`;
3. ratio `r_t = (cos(q_t, c_0) + 1) / (cos(q_t, c_1) + 1)`; tokens are sorted
   by r (stable) and the first `n // 2` form the first child, the rest the
   second: the two children have equal sizes (up to one token).

Leaves have `floor` or `ceil` of `T / 2^L` tokens (<= cluster_size). Every
query attends to the keys of its own leaf; with `overlap = o > 0` the two
leaves of a final split also see the `o` tokens of their sibling nearest the
split (the first child gets the sibling's first `o` tokens in ratio order,
the second child the last `o` of the first: the code's 20-token overlap of
its 49-token clusters). The grouping is not differentiated (the code
detaches the assignments; sorting gives no gradient), so gradients flow
through q, k, v inside the groups only.

Departures from the code: token counts need not be `49 * 2^L` (splits are
floor/ceil halves), the grouping is computed once per call in float32 on
the stop-gradient queries; an optional `key_mask` (True = may be attended)
masks keys (whatever a masked slot holds never reaches outputs or
gradients; a query whose group has no valid key returns zeros). Grouping
uses the queries of every token, masked or not.

The layers: `FeatureSpaceLocalAttention` is the code's `ContentAttention`
(qkv Linear, FSLA, plus a 3x3 depthwise conv of V in image order, proj);
`BilateralLocalAttention` is the BOAT block without its MLP:
`x + ISLA(LN(x))`, then `+ FSLA(LN(.))` (BOAT-Swin / BOAT-CSWin order).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnjax._dispatch import Op
from attnjax.spatial._common import HeadGated
from attnjax.spatial._common import (check_channels_last, check_spatial_qkv,
                                     default_scale, dense_attention_reference,
                                     flatten_spatial, heads_and_scale,
                                     masked_softmax, repeat_kv)
from attnjax.spatial.window import WindowAttention

__all__ = ["feature_space_local_attention",
           "feature_space_local_attention_reference", "feature_space_clusters",
           "FeatureSpaceLocalAttention", "BilateralLocalAttention",
           "FEATURE_SPACE_LOCAL_ATTENTION"]

FEATURE_SPACE_LOCAL_ATTENTION = Op("spatial.feature_space_local_attention")


def _check(query, key, value, cluster_size, overlap, iters, sharpness,
           key_mask):
  check_spatial_qkv(query, key, value, spatial_dims=(1, 2, 3))
  for name, val, lo in (("cluster_size", cluster_size, 2),
                        ("overlap", overlap, 0), ("iters", iters, 0)):
    if not isinstance(val, (int, np.integer)) or isinstance(val, bool) or (
        val < lo):
      raise ValueError(f"`{name}` must be an int >= {lo}, got {val!r} "
                       f"(query shape {tuple(query.shape)}).")
  if not np.isfinite(float(sharpness)):
    raise ValueError(f"`sharpness` must be finite, got {sharpness!r}.")
  if key_mask is not None:
    want = tuple(query.shape[:-2])
    if tuple(key_mask.shape) != want or key_mask.dtype != jnp.bool_:
      raise ValueError(
          f"`key_mask` must be bool [batch, *spatial]={want}, got "
          f"{tuple(key_mask.shape)} {key_mask.dtype} (query shape "
          f"{tuple(query.shape)}).")


def _plan(t: int, cluster_size: int):
  """Static split plan: levels and, per level, the (start, size) of every
  group in the permuted order (floor/ceil halves)."""
  levels = 0
  while -(-t // (2 ** levels)) > cluster_size:
    levels += 1
  bounds = [[(0, t)]]
  for _ in range(levels):
    nxt = []
    for s, n in bounds[-1]:
      nxt += [(s, n // 2), (s + n // 2, n - n // 2)]
    bounds.append(nxt)
  return levels, bounds


def _normalize(x, axis=-1):
  n = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(n, 1e-12)


def _cluster_perm(q, bounds, iters, sharpness):
  """q [B, N, T, D] float32 -> perm [B, N, T]: token at each permuted
  position; leaves are contiguous ranges of bounds[-1]."""
  b, n, t, _ = q.shape
  perm = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, n, t))
  for segs in bounds[:-1]:
    ns = len(segs)
    seg = np.concatenate([np.full(sz, i) for i, (_, sz) in enumerate(segs)])
    half = np.concatenate([np.r_[np.zeros(sz // 2, int),
                                 np.ones(sz - sz // 2, int)] for _, sz in segs])
    counts = np.bincount(2 * seg + half, minlength=2 * ns).astype(np.float32)
    x = jnp.take_along_axis(q, perm[..., None], axis=2)
    xt = jnp.moveaxis(x, 2, 0)                                  # [T, B, N, D]
    c = jax.ops.segment_sum(xt, 2 * seg + half, num_segments=2 * ns)
    c = _normalize(c / counts[:, None, None, None])
    c = c.reshape(ns, 2, b, n, -1)
    xn = _normalize(x)
    for _ in range(iters):
      s = jnp.einsum("bntd,tjbnd->bntj", xn, c[seg])
      a = jax.nn.softmax(sharpness * s, axis=-1)
      c = _normalize(jax.ops.segment_sum(
          jnp.einsum("bntj,bntd->tjbnd", a, x), seg, num_segments=ns))
    s = jnp.einsum("bntd,tjbnd->bntj", xn, c[seg])
    ratio = (s[..., 0] + 1.0) / (s[..., 1] + 1.0)
    order = jnp.lexsort((ratio, jnp.broadcast_to(jnp.asarray(seg), ratio.shape)),
                        axis=-1)
    perm = jnp.take_along_axis(perm, order, axis=-1)
  return perm


def _leaf_tables(levels, bounds, overlap):
  """Static gather tables over permuted positions: query slots [nl, smax],
  key slots [nl, smax + o] (+ validity), slot of each position."""
  leaves = bounds[-1]
  nl = len(leaves)
  smax = max(sz for _, sz in leaves)
  o = overlap if levels > 0 else 0
  qidx = np.zeros((nl, smax), np.int32)
  qok = np.zeros((nl, smax), bool)
  kidx = np.zeros((nl, smax + o), np.int32)
  kok = np.zeros((nl, smax + o), bool)
  pos_slot = np.zeros(sum(sz for _, sz in leaves), np.int32)
  for i, (s, sz) in enumerate(leaves):
    qidx[i, :sz], qok[i, :sz] = s + np.arange(sz), True
    pos_slot[s:s + sz] = i * smax + np.arange(sz)
    keys = list(range(s, s + sz))
    if o:
      ss, ssz = leaves[i ^ 1]
      m = min(o, ssz)
      keys += (list(range(ss, ss + m)) if i % 2 == 0
               else list(range(ss + ssz - m, ss + ssz)))
    kidx[i, :len(keys)], kok[i, :len(keys)] = keys, True
  return qidx, qok, kidx, kok, pos_slot


def feature_space_clusters(query, cluster_size: int = 49, *, iters: int = 2,
                           sharpness: float = 100.0):
  """BOAT's balanced hierarchical clustering of the queries.

  Args:
    query: [B, *spatial, N, D] (or tokens [B, T, N, D]).
  Returns:
    (perm, cluster): int32 [B, N, T]; `perm[b, n, p]` is the token at
    permuted position p (clusters are contiguous runs of positions) and
    `cluster[b, n, t]` the leaf cluster of token t.
  """
  _check(query, query, query, cluster_size, 0, iters, sharpness, None)
  q = jnp.moveaxis(flatten_spatial(query), 2, 1)
  levels, bounds = _plan(q.shape[2], cluster_size)
  perm = _cluster_perm(jax.lax.stop_gradient(q.astype(jnp.float32)), bounds,
                       iters, float(sharpness))
  leaf_of_pos = np.concatenate([np.full(sz, i, np.int32)
                                for i, (_, sz) in enumerate(bounds[-1])])
  inv = jnp.argsort(perm, axis=-1)
  return perm, jnp.asarray(leaf_of_pos)[inv]


def _xla(config, query, key, value, *, cluster_size, overlap, iters,
         sharpness, key_mask, scale):
  del config
  b, n = query.shape[0], query.shape[-2]
  q, k, v = flatten_spatial(query), flatten_spatial(key), flatten_spatial(value)
  t, dv = q.shape[1], v.shape[-1]
  km = None
  if key_mask is not None:         # masked slots never reach values or grads
    km = key_mask.reshape(b, t)
    k = jnp.where(km[..., None, None], k, 0)
    v = jnp.where(km[..., None, None], v, 0)
  k, v = repeat_kv(k, n), repeat_kv(v, n)
  levels, bounds = _plan(t, cluster_size)
  qh = jnp.moveaxis(q, 2, 1)                                    # [B, N, T, D]
  perm = _cluster_perm(jax.lax.stop_gradient(qh.astype(jnp.float32)), bounds,
                       iters, sharpness)
  take = lambda x: jnp.take_along_axis(x, perm[..., None], axis=2)
  qp, kp, vp = take(qh), take(jnp.moveaxis(k, 2, 1)), take(jnp.moveaxis(v, 2, 1))
  qidx, _, kidx, kok, pos_slot = _leaf_tables(levels, bounds, overlap)
  qs, ks, vs = qp[:, :, qidx], kp[:, :, kidx], vp[:, :, kidx]
  ok = jnp.asarray(kok)[None, None, :, None, :]
  if km is not None:
    kmp = jnp.take_along_axis(jnp.broadcast_to(km[:, None], (b, n, t)), perm,
                              axis=2)
    ok = ok & kmp[:, :, kidx][:, :, :, None, :]
  logits = jnp.einsum("bncqd,bnckd->bncqk", qs, ks,
                      preferred_element_type=jnp.float32) * scale
  p = masked_softmax(logits, ok)
  o = jnp.einsum("bncqk,bnckd->bncqd", p.astype(vs.dtype), vs,
                 preferred_element_type=jnp.float32)
  o = o.reshape(b, n, -1, dv)[:, :, pos_slot]          # permuted order
  o = jnp.take_along_axis(o, jnp.argsort(perm, axis=-1)[..., None], axis=2)
  out = jnp.moveaxis(o, 1, 2).reshape(query.shape[:-1] + (dv,))
  return out.astype(query.dtype)


FEATURE_SPACE_LOCAL_ATTENTION.register("xla", _xla)


def feature_space_local_attention(query, key, value, cluster_size: int = 49,
                                  *, overlap: int = 0, iters: int = 2,
                                  sharpness: float = 100.0, key_mask=None,
                                  scale: Optional[float] = None,
                                  implementation=None):
  """BOAT feature-space local attention (FSLA).

  Args:
    query: [B, *spatial, N, D] (1-3 spatial dims; tokens [B, T, N, D]);
      key/value [B, *spatial, K, D|Dv], N % K == 0.
    cluster_size: largest cluster (BOAT: 49, the window area).
    overlap: keys each cluster also takes from its sibling (BOAT's code: 20).
    iters, sharpness: soft k-means steps and softmax sharpness of a split.
    key_mask: optional bool [B, *spatial], True = may be attended.
    scale: logit scale (default 1/sqrt(D)).
    implementation: dispatch (`FEATURE_SPACE_LOCAL_ATTENTION`: 'xla').
  Returns: [B, *spatial, N, Dv] in query.dtype. Memory and FLOPs are
  O(T cluster_size) per head plus O(T log T) for the grouping.
  """
  _check(query, key, value, cluster_size, overlap, iters, sharpness, key_mask)
  return FEATURE_SPACE_LOCAL_ATTENTION(
      implementation, query, key, value, cluster_size=int(cluster_size),
      overlap=int(overlap), iters=int(iters), sharpness=float(sharpness),
      key_mask=key_mask, scale=default_scale(scale, query.shape[-1]))


def feature_space_local_attention_reference(query, key, value,
                                            cluster_size: int = 49, *,
                                            overlap: int = 0, iters: int = 2,
                                            sharpness: float = 100.0,
                                            key_mask=None,
                                            scale: Optional[float] = None):
  """Dense [T, T] attention with the mask 'same cluster, or in the sibling
  overlap' built from `feature_space_clusters` (materializes [T, T])."""
  _check(query, key, value, cluster_size, overlap, iters, sharpness, key_mask)
  scale = default_scale(scale, query.shape[-1])
  b = query.shape[0]
  q = flatten_spatial(query)
  t = q.shape[1]
  levels, bounds = _plan(t, cluster_size)
  perm, _ = feature_space_clusters(query, cluster_size, iters=iters,
                                   sharpness=sharpness)
  qidx, qok, kidx, kok, _ = _leaf_tables(levels, bounds, overlap)
  allowed = np.zeros((t, t), bool)       # between permuted positions
  for i in range(qidx.shape[0]):
    allowed[np.ix_(qidx[i][qok[i]], kidx[i][kok[i]])] = True
  inv = jnp.argsort(perm, axis=-1)
  m = jnp.asarray(allowed)[inv[..., :, None], inv[..., None, :]]
  if key_mask is not None:
    m = m & key_mask.reshape(b, 1, 1, t)
  out = dense_attention_reference(q, flatten_spatial(key),
                                  flatten_spatial(value), m, scale=scale)
  return out.reshape(query.shape[:-1] + value.shape[-1:])


class FeatureSpaceLocalAttention(HeadGated):
  """BOAT's `ContentAttention` on [B, H, W, C]: `qkv` Linear(dim, 3 dim,
  bias=qkv_bias), FSLA per head, plus `get_v` (3x3 depthwise conv of V in
  image order, with bias), then `proj` Linear(dim, dim)."""

  def __init__(self, dim: int, num_heads: int, cluster_size: int = 49,
               overlap: int = 20, *, iters: int = 2, sharpness: float = 100.0,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim, self.num_heads = dim, num_heads
    self.head_dim, self.scale = heads_and_scale(dim, num_heads, qk_scale)
    self.cluster_size, self.overlap = cluster_size, overlap
    self.iters, self.sharpness = iters, sharpness
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.get_v = nnx.Conv(dim, dim, (3, 3), padding="SAME",
                          feature_group_count=dim, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    out = feature_space_local_attention(
        q, k, v, self.cluster_size, overlap=self.overlap, iters=self.iters,
        sharpness=self.sharpness, key_mask=key_mask, scale=self.scale)
    out = out.reshape(x.shape) + self.get_v(v.reshape(x.shape))
    out = self.gate_heads(out.reshape(*x.shape[:-1], self.num_heads, -1))
    return self.proj(out.reshape(x.shape))


class BilateralLocalAttention(nnx.Module):
  """BOAT's bilateral local attention (the block without its MLP) on
  [B, H, W, C]: `x + ISLA(norm1(x))` with Swin's `WindowAttention`
  (`attn`), then `+ FSLA(norm_c(.))` with `FeatureSpaceLocalAttention`
  (`attn_c`)."""

  def __init__(self, dim: int, num_heads: int, window_size: int = 7,
               cluster_size: int = 49, overlap: int = 20, *, shift_size=0,
               qkv_bias: bool = True, qk_scale: Optional[float] = None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim = dim
    self.norm1 = nnx.LayerNorm(dim, param_dtype=param_dtype, rngs=rngs)
    self.attn = WindowAttention(dim, num_heads, window_size,
                                shift_size=shift_size, qkv_bias=qkv_bias,
                                qk_scale=qk_scale, param_dtype=param_dtype,
                                rngs=rngs)
    self.norm_c = nnx.LayerNorm(dim, param_dtype=param_dtype, rngs=rngs)
    self.attn_c = FeatureSpaceLocalAttention(
        dim, num_heads, cluster_size, overlap, qkv_bias=qkv_bias,
        qk_scale=qk_scale, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, key_mask=None):
    check_channels_last(x, self.dim, 2)
    x = x + self.attn(self.norm1(x))
    return x + self.attn_c(self.norm_c(x), key_mask=key_mask)
