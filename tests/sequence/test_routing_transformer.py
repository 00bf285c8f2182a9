"""Routing Transformer: k-means-routed attention against a float64 NumPy
re-derivation of the clusters, and the pure online k-means step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc

CENT = np.asarray(sq.init_centroids(jax.random.key(3), 3, 8, 4))


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def _ref64(q, k, v, centroids=CENT, *, capacity=None, is_causal=False,
           mask=None):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  cent = _unit(np.asarray(centroids, np.float64))
  c = cent.shape[1]
  w = min(s, -(-s // c)) if capacity is None else min(capacity, s)
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hd in range(n):
      kk, vv = k[bi, :, hd // g], v[bi, :, hd // g]
      aff = _unit(kk) @ cent[hd].T                         # [s, c]
      aff = np.where(keep[bi][:, None], aff, -np.inf)
      for i in range(t):
        ci = np.argmax(cent[hd] @ _unit(q[bi, i, hd]))
        chosen = np.argsort(-aff[:, ci], kind="stable")[:w]
        ok = np.zeros(s, bool)
        ok[chosen] = np.isfinite(aff[chosen, ci])
        if is_causal:
          ok &= np.arange(s) <= i
        if not ok.any():
          continue
        z = np.where(ok, kk @ q[bi, i, hd] / np.sqrt(h), -np.inf)
        p = np.exp(z - z.max())
        out[bi, i, hd] = p @ vv / p.sum()
  return out


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False),
                                          (False, True), (True, True)])
def test_four_patterns_match_float64(causal, cross):
  q, k, v = zc.inputs(0, t=13, s=10 if cross else 13)
  fn = functools.partial(sq.routing_transformer_attention, centroids=CENT)
  zc.check_values(fn, _ref64, q, k, v, is_causal=causal, capacity=5)


def test_full_capacity_single_cluster_is_softmax():
  q, k, v = zc.inputs(1)
  out = sq.routing_transformer_attention(q, k, v, CENT[:, :1], is_causal=True)
  import attnjax
  want = attnjax.dot_product_attention(q, k, v, is_causal=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2)
  fn = functools.partial(sq.routing_transformer_attention, centroids=CENT)
  ref = functools.partial(sq.routing_transformer_attention_reference,
                          centroids=CENT)
  kw = dict(is_causal=True, capacity=6)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_kmeans_update_pure_and_matches_numpy():
  q, k, _ = zc.inputs(4, t=10, n=2, k=1)
  cent = np.asarray(sq.init_centroids(jax.random.key(0), 3, 8, 2))
  new = np.asarray(sq.kmeans_update(cent, q, k, decay=0.9))
  for hd in range(2):
    vecs = np.concatenate([_unit(np.asarray(q)[:, :, hd].reshape(-1, 8)),
                           _unit(np.asarray(k)[:, :, 0].reshape(-1, 8))])
    assign = np.argmax(vecs @ cent[hd].T, 1)
    for c in range(3):
      if (assign == c).any():
        want = _unit(0.9 * cent[hd, c] + 0.1 * vecs[assign == c].mean(0))
      else:
        want = cent[hd, c]
      np.testing.assert_allclose(new[hd, c], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new, axis=-1), 1.0, rtol=1e-6)
  # Repeated steps on the same data converge (k-means fixed point).
  c2 = cent
  for _ in range(200):
    c2 = sq.kmeans_update(c2, q, k, decay=0.5)
  c3 = sq.kmeans_update(c2, q, k, decay=0.5)
  np.testing.assert_allclose(c3, c2, atol=1e-5)
  with pytest.raises(ValueError, match="decay"):
    sq.kmeans_update(cent, q, k, decay=1.0)


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(ValueError, match="centroids"):
    sq.routing_transformer_attention(q, k, v, np.ones((3, 5)))
  with pytest.raises(ValueError, match="centroids"):
    sq.routing_transformer_attention(q, k, v, np.ones((2, 3, 8)))
  with pytest.raises(ValueError, match="capacity"):
    sq.routing_transformer_attention(q, k, v, CENT, capacity=0)
  with pytest.raises(ValueError, match="head_dim"):
    sq.routing_transformer_attention(q, k[..., :5], v, CENT)
  with pytest.raises(ValueError, match="implementation"):
    sq.routing_transformer_attention(q, k, v, CENT, implementation="nope")


def test_layer_updates_centroids_only_when_asked():
  layer = sq.RoutingTransformerAttention(4, 16, num_kv_heads=2, head_dim=8,
                                         num_clusters=3, capacity=6,
                                         decay=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  c0 = np.asarray(layer.centroids.value)
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  np.testing.assert_array_equal(layer.centroids.value, c0)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.routing_transformer_attention_reference(
      q, k, v, c0, capacity=6, is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  layer.update_centroids = True
  layer(x, is_causal=True)
  np.testing.assert_allclose(layer.centroids.value,
                             sq.kmeans_update(c0, q, k, decay=0.5), atol=1e-6)
  assert len(jax.tree.leaves(nnx.state(layer, nnx.Param))) > 0
  assert all(not isinstance(p, sq.Centroids) for p in
             jax.tree.leaves(nnx.state(layer, nnx.Param)))
