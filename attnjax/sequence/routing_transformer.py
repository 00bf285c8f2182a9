"""Routing Transformer attention (Roy, Saffar, Vaswani, Grangier 2021,
"Efficient content-based sparse attention with Routing Transformers").

Queries and keys are routed to C clusters by spherical k-means: with unit
vectors q^ = q/|q|, k^ = k/|k| and unit centroids mu_c (one set per query
head), query i belongs to c(i) = argmax_c q^_i . mu_c. Each cluster keeps
its `capacity` keys closest to its centroid (top-w of k^_j . mu_c: balanced
clusters of w keys, as the paper's equal-size routing), and query i attends
with softmax to the keys of its own cluster only (causal: also j <= i).
Cost O(T w H + (T + S) C H): with C ~ sqrt(S) clusters of w ~ S / C keys,
O(S^1.5) as in the paper. A query whose cluster has no allowed key (e.g. an
early causal query whose cluster's keys all lie ahead) gives zeros.

The centroids are not trained by gradient: `kmeans_update(centroids, q, k)`
is the online (mini-batch, exponential moving average) k-means step, a pure
function returning new unit centroids; `RoutingTransformerAttention` holds
them as a non-trainable `Centroids` variable and updates them in training
(`update_centroids=True`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax._dispatch import Op
from attnjax._numerics import NEG, masked_softmax
from attnjax.nn import MultiHeadAttention
from attnjax.sequence import _common
from attnjax.softmax import dot_product_attention

SUPPORT = {
    "noncausal_self": True,
    "causal_self": True,
    "noncausal_cross": True,
    "causal_cross": True,
}

_EPS = 1e-6
_QUERY_CHUNK = 128


def _unit(x):
  x = x.astype(jnp.float32)
  n = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(n, _EPS)


def _check_centroids(centroids, n, h):
  c = jnp.asarray(centroids)
  if c.ndim == 2:
    c = jnp.broadcast_to(c[None], (n,) + c.shape)
  if c.ndim != 3 or c.shape[0] != n or c.shape[2] != h or c.shape[1] < 1:
    raise ValueError(
        f"`centroids` must have shape [num_clusters, {h}] or [{n}, "
        f"num_clusters, {h}] (query heads, clusters, head_dim), got "
        f"{jnp.shape(centroids)}.")
  return jax.lax.stop_gradient(_unit(c))


def routing_assignments(query, key, centroids, *, capacity: int, kv_mask=None):
  """(query cluster [B, T, N], cluster key indices [B, N, C, w], their
  validity [B, N, C, w]) for batched BTNH / BSKH inputs."""
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  cent = _check_centroids(centroids, n, h)
  cq = jnp.argmax(jnp.einsum("btnh,nch->btnc", _unit(query), cent), -1)
  aff = jnp.einsum("bskh,kgch->bkgcs", _unit(key),
                   cent.reshape(k, n // k, -1, h)).reshape(b, n, -1, s)
  ok = jnp.ones((b, 1, 1, s), bool) if kv_mask is None else \
      kv_mask[:, None, None, :]
  aff = jnp.where(ok, aff, NEG)
  top, idx = jax.lax.top_k(aff, capacity)
  return cq, idx, top > 0.5 * NEG


def _check_capacity(capacity, s):
  if capacity is None:
    return None
  return min(_common.check_positive_int("capacity", capacity), s)


_OP = Op("routing_transformer_attention")


@_OP.register("xla")
def _xla(config, query, key, value, centroids, *, capacity, is_causal, scale,
         kv_mask, dims):
  del config
  b, t, n, s, k, h, hv = dims
  g = n // k
  c = _check_centroids(centroids, n, h).shape[1]
  w = capacity if capacity is not None else min(s, -(-s // c))
  cq, idx, valid = routing_assignments(query, key, centroids, capacity=w,
                                       kv_mask=kv_mask)
  # Per query: its cluster's key indices [B, T, N, w].
  qidx = jnp.take_along_axis(idx[:, None], cq[..., None, None], axis=3)[..., 0, :]
  qval = jnp.take_along_axis(valid[:, None], cq[..., None, None], axis=3)[..., 0, :]
  kh = jnp.arange(n) // g
  tc = min(t, _QUERY_CHUNK)
  tp = _common.round_up(t, tc)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t)) + ((0, 0),) * (x.ndim - 2))
  qpos = jnp.arange(tp)

  def one_chunk(xs):
    qc, ic, vc, pc = xs                     # [B,tc,N,H], [B,tc,N,w] x2, [tc]
    kg = key[jnp.arange(b)[:, None, None, None], ic, kh[None, None, :, None]]
    vg = value[jnp.arange(b)[:, None, None, None], ic, kh[None, None, :, None]]
    sc = jnp.einsum("btnh,btnwh->btnw", qc.astype(jnp.float32),
                    kg.astype(jnp.float32)) * scale
    ok = vc & (ic <= pc[None, :, None, None]) if is_causal else vc
    p = masked_softmax(sc, ok)
    return jnp.einsum("btnw,btnwd->btnd", p, vg.astype(jnp.float32))

  xs = (pad(query), pad(qidx), pad(qval), qpos)
  xs = tuple(jnp.moveaxis(x.reshape((x.shape[0], tp // tc, tc) + x.shape[2:]),
                          1, 0) if x.ndim > 1 else x.reshape(tp // tc, tc)
             for x in xs)
  out = jax.lax.map(one_chunk, xs)           # [chunks, B, tc, N, Hv]
  out = jnp.moveaxis(out, 0, 1).reshape(b, tp, n, hv)[:, :t]
  return out.astype(query.dtype)


def routing_transformer_attention(query, key, value, centroids, *,
                                  capacity: Optional[int] = None,
                                  is_causal: bool = False,
                                  scale: Optional[float] = None, mask=None,
                                  bias=None, dropout_rate: float = 0.0,
                                  dropout_rng=None, implementation=None):
  """Softmax attention within k-means clusters (Routing Transformer).

  Args:
    query: [B, T, N, H] (or unbatched); key [B, S, K, H]; value [B, S, K, Hv].
    centroids: [C, H] (shared) or [N, C, H] (per query head) cluster
      centroids (normalized here; not differentiated).
    capacity: keys kept per cluster (top-w by affinity); default ceil(S/C).
    is_causal: additionally j <= i (top-left aligned).
    scale: default 1/sqrt(H).
    mask: key-padding mask broadcastable to [B, 1, 1, S].
    implementation: None / 'xla'.

  Returns:
    [B, T, N, Hv] in query.dtype; a query with no allowed key gets zeros.
  """
  del dropout_rng
  _common.reject("bias", bias, "routing_transformer_attention",
                 "only the keys of each query's cluster are gathered.")
  _common.reject("dropout_rate", dropout_rate, "routing_transformer_attention",
                 "attention dropout is not implemented for routed keys.")
  query, key, value, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, k, h, hv = dims
  kv_mask = _common.key_padding_mask(
      mask, b, n, t, s, mechanism="routing_transformer_attention",
      unbatched=unbatched)
  key = _common.zero_masked(key, kv_mask)
  value = _common.zero_masked(value, kv_mask)
  _check_centroids(centroids, n, h)
  out = _OP(implementation, query, key, value, centroids,
            capacity=_check_capacity(capacity, s), is_causal=is_causal,
            scale=_common.default_scale(scale, h), kv_mask=kv_mask, dims=dims)
  return out[0] if unbatched else out


def routing_transformer_attention_reference(query, key, value, centroids, *,
                                            capacity: Optional[int] = None,
                                            is_causal: bool = False,
                                            scale: Optional[float] = None,
                                            mask=None):
  """Dense softmax attention with the routing mask [B, N, T, S]."""
  q, k, v, dims, unbatched = _common.prepare_qkv(query, key, value)
  b, t, n, s, kk, h, hv = dims
  kv_mask = _common.key_padding_mask(
      mask, b, n, t, s, mechanism="routing_transformer_attention",
      unbatched=unbatched)
  c = _check_centroids(centroids, n, h).shape[1]
  w = _check_capacity(capacity, s) or min(s, -(-s // c))
  cq, idx, valid = routing_assignments(q, k, centroids, capacity=w,
                                       kv_mask=kv_mask)
  member = jnp.zeros((b, n, c, s), bool).at[
      jnp.arange(b)[:, None, None, None], jnp.arange(n)[None, :, None, None],
      jnp.arange(c)[None, None, :, None], idx].set(valid)     # [B, N, C, S]
  allowed = jnp.take_along_axis(member, jnp.moveaxis(cq, 1, 2)[..., None],
                                axis=2)                       # [B, N, T, S]
  if kv_mask is not None:
    allowed = allowed & kv_mask[:, None, None, :]
  out = dot_product_attention(q, k, v, mask=allowed, scale=scale,
                              is_causal=is_causal, implementation="xla")
  return out[0] if unbatched else out


def kmeans_update(centroids, query, key, *, decay: float = 0.999, mask=None):
  """One online spherical k-means step (pure): new unit centroids.

  Every unit query and key vector is assigned to its nearest centroid (per
  query head; keys of a kv head count for each of its query heads), and
  mu_c <- normalize(decay * mu_c + (1 - decay) * mean of its assigned
  vectors); a centroid with nothing assigned keeps its direction. `mask`
  (key padding, [B, S] or broadcastable to [B, 1, 1, S]) leaves padded keys
  out. Shapes as `routing_transformer_attention`; returns [N, C, H] (or
  [C, H] if given [C, H] with one query head).
  """
  if not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"`decay` must lie in [0, 1), got {decay!r}.")
  q, k, _, dims, unbatched = _common.prepare_qkv(query, key, key)
  b, t, n, s, kk, h, _ = dims
  kv_mask = _common.key_padding_mask(
      mask, b, n, t, s, mechanism="kmeans_update", unbatched=unbatched)
  k = _common.zero_masked(k, kv_mask)
  shared = jnp.ndim(centroids) == 2
  cent = _check_centroids(centroids, n, h)
  c = cent.shape[1]
  qu = _unit(q)                                          # [B, T, N, H]
  ku = jnp.repeat(_unit(k), n // kk, axis=2)             # [B, S, N, H]
  kok = jnp.ones((b, s), bool) if kv_mask is None else kv_mask
  oh_q = jax.nn.one_hot(jnp.argmax(jnp.einsum("btnh,nch->btnc", qu, cent),
                                   -1), c)
  oh_k = jax.nn.one_hot(jnp.argmax(jnp.einsum("bsnh,nch->bsnc", ku, cent),
                                   -1), c) * kok[:, :, None, None]
  sums = (jnp.einsum("btnc,btnh->nch", oh_q, qu) +
          jnp.einsum("bsnc,bsnh->nch", oh_k, ku))
  counts = jnp.sum(oh_q, axis=(0, 1)) + jnp.sum(oh_k, axis=(0, 1))  # [N, C]
  mean = sums / jnp.maximum(counts, 1.0)[..., None]
  new = jnp.where(counts[..., None] > 0,
                  decay * cent + (1.0 - decay) * mean, cent)
  new = jax.lax.stop_gradient(_unit(new))
  if shared and n == 1:
    return new[0]
  return new


def init_centroids(rng, num_clusters: int, head_dim: int,
                   num_heads: Optional[int] = None):
  """Random unit centroids [C, H] (or [N, C, H])."""
  c = _common.check_positive_int("num_clusters", num_clusters)
  h = _common.check_positive_int("head_dim", head_dim)
  shape = (c, h) if num_heads is None else (
      _common.check_positive_int("num_heads", num_heads), c, h)
  return _unit(jax.random.normal(rng, shape))


class Centroids(nnx.Variable):
  """Non-trainable k-means centroids (not in nnx.Param)."""


class RoutingTransformerAttention(MultiHeadAttention):
  """MultiHeadAttention with `routing_transformer_attention`.

  Centroids [N, C, head_dim] are drawn at construction and, when the layer
  is called with `update_centroids=True` (training), moved by one
  `kmeans_update` step on the call's queries and keys before attending
  (the layer mutates only its `Centroids` variable).
  """

  def __init__(self, num_heads: int, in_features: int, *args,
               num_clusters: int = 4, capacity: Optional[int] = None,
               decay: float = 0.999, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, *args, rngs=rngs, **kwargs)
    if not 0.0 <= float(decay) < 1.0:
      raise ValueError(f"`decay` must lie in [0, 1), got {decay!r}.")
    self.capacity = capacity
    self.decay = float(decay)
    self.centroids = Centroids(init_centroids(rngs.params(), num_clusters,
                                              self.head_dim, num_heads))
    self.update_centroids = False

  def attend(self, q, k, v, mask=None, **kwargs):
    if self.update_centroids:
      self.centroids.value = kmeans_update(self.centroids.value, q, k,
                                           decay=self.decay, mask=mask)
    return routing_transformer_attention(q, k, v, self.centroids.value,
                                         capacity=self.capacity, mask=mask,
                                         **kwargs)
