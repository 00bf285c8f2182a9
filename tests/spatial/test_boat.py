"""BOAT feature-space local attention: float64 per-query definition (own
recursive balanced clustering), reference, jit/vmap/grad, bf16, masks,
clustering properties, errors, layers. The primitive is checked against
the float64 definition, the reference against the primitive (values and
gradients), so each compile is done once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

# one compile shared by the float64 and the masked-slot tests
_FSLA_C6_O2 = jax.jit(lambda q, k, v, km: sp.feature_space_local_attention(
    q, k, v, 6, overlap=2, key_mask=km))


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _split64(x, idx, iters, sharp):
  """One balanced 2-way split (BOAT): mean-of-halves init, soft k-means on
  cosine similarity, sort by (cos0 + 1) / (cos1 + 1), cut in the middle."""
  xs, h = x[idx], len(idx) // 2
  c = _unit(np.stack([xs[:h].mean(0), xs[h:].mean(0)]))
  xn = _unit(xs)
  for _ in range(iters):
    s = sharp * xn @ c.T
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    c = _unit(a.T @ xs)
  s = xn @ c.T
  order = np.argsort((s[:, 0] + 1) / (s[:, 1] + 1), kind="stable")
  idx = idx[order]
  return [idx[:h], idx[h:]]


def _groups64(x, cs, iters=2, sharp=100.0):
  groups = [np.arange(len(x))]
  while max(len(g) for g in groups) > cs:
    groups = [p for g in groups for p in _split64(x, g, iters, sharp)]
  return groups


def _fsla64(q, k, v, cs, overlap, key_mask, scale):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_, n, shape = q.shape[0], q.shape[-2], q.shape[:-1] + v.shape[-1:]
  q = q.reshape(b_, -1, n, q.shape[-1])
  k = k.reshape(b_, -1, *k.shape[-2:])
  v = v.reshape(b_, -1, *v.shape[-2:])
  km = (np.ones(q.shape[:2], bool) if key_mask is None
        else np.asarray(key_mask).reshape(b_, -1))
  rep = n // k.shape[-2]
  out = np.zeros(q.shape[:-1] + (v.shape[-1],))
  for bi in range(b_):
    for hd in range(n):
      groups = _groups64(q[bi, :, hd], cs)
      for gi, g in enumerate(groups):
        keys = list(g)
        if overlap and len(groups) > 1:
          sib = groups[gi ^ 1]
          m = min(overlap, len(sib))
          keys += list(sib[:m] if gi % 2 == 0 else sib[len(sib) - m:])
        keys = np.array(keys)
        for t in g:
          lg = scale * k[bi, keys, hd // rep] @ q[bi, t, hd]
          p = softmax64(lg, km[bi, keys])
          out[bi, t, hd] = p @ v[bi, keys, hd // rep]
  return out.reshape(shape), groups


def _inputs(shape=(2, 5, 7, 2, 4), kvh=1, dv=3):
  b, h, w, n, d = shape
  return (normal(0, shape), normal(1, (b, h, w, kvh, d)),
          normal(2, (b, h, w, kvh, dv)))


def test_matches_float64_definition_and_reference():
  q, k, v = _inputs()
  km = jax.random.bernoulli(jax.random.key(5), 0.8, (2, 5, 7))
  want, groups = _fsla64(q, k, v, 6, 2, np.asarray(km), 0.5)
  np.testing.assert_allclose(_FSLA_C6_O2(q, k, v, km), want, atol=2e-5,
                             rtol=2e-5)
  # the clusters of the last (batch, head) are the float64 ones, balanced
  _, cl = jax.jit(lambda q: sp.feature_space_clusters(q, 6))(q)
  cl = np.asarray(cl[1, 1])
  assert {len(g) for g in groups} == {4, 5} and len(groups) == 8
  for i, g in enumerate(groups):
    np.testing.assert_array_equal(cl[g], i)


def test_values_grads_jit_vmap_and_bf16():
  q, k, v = _inputs((1, 3, 4, 2, 4), kvh=2)
  fn = jax.jit(lambda q, k, v: sp.feature_space_local_attention(
      q, k, v, 3, overlap=1))
  ref = jax.jit(lambda q, k, v: sp.feature_space_local_attention_reference(
      q, k, v, 3, overlap=1))
  check_values_grads_jit_vmap(fn, ref, (q, k, v))
  check_bf16(fn, ref, (q, k, v), atol=8e-2)


def test_masked_keys_never_reach_output_and_empty_rows_are_zero():
  q, k, v = _inputs()
  km = np.ones((2, 5, 7), bool)
  km[0, 1, 3] = False
  km[1] = False                                  # batch 1: nothing valid
  km = jnp.asarray(km)
  kn = k.at[0, 1, 3].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 3].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: _FSLA_C6_O2(q, k, v, km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  gk, gv = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert np.isfinite(np.asarray(gk)).all() and np.isfinite(np.asarray(gv)).all()


def test_clusters_follow_features_not_positions():
  """Two feature directions on a checkerboard: with clusters of T/2 the
  split separates them exactly (window attention would mix them)."""
  h = w = 6
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  cls = (yy + xx) % 2
  base = np.where(cls[..., None] == 0, [3.0, 0, 0, 0], [0, 3.0, 0, 0])
  q = jnp.asarray(base + 0.3 * np.asarray(normal(3, (h, w, 4))))[None, :, :, None]
  _, cl = jax.jit(lambda q: sp.feature_space_clusters(q, 18))(
      q.astype(jnp.float32))
  cl = np.asarray(cl[0, 0]).reshape(h, w)
  assert len(np.unique(cl)) == 2
  assert all(len(np.unique(cls[cl == c])) == 1 for c in (0, 1))
  # one cluster covering everything is plain attention
  qq, k, v = _inputs((1, 3, 4, 2, 4), kvh=2, dv=4)
  np.testing.assert_allclose(
      *jax.jit(lambda *a: (sp.feature_space_local_attention(*a, 12),
                           sp.window_attention(*a, (3, 4))))(qq, k, v),
      atol=1e-5)


def test_errors():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="cluster_size"):
    sp.feature_space_local_attention(q, k, v, 1)
  with pytest.raises(ValueError, match="overlap"):
    sp.feature_space_local_attention(q, k, v, 4, overlap=-1)
  with pytest.raises(ValueError, match="key_mask.*\\(2, 5, 7\\)"):
    sp.feature_space_local_attention(q, k, v, 4,
                                     key_mask=jnp.ones((2, 35), bool))
  with pytest.raises(ValueError, match="query"):
    sp.feature_space_local_attention(q[..., 0, :], k, v, 4)
  with pytest.raises(ValueError, match="implementation"):
    sp.feature_space_local_attention(q, k, v, 4, implementation="nope")


def test_layers_match_primitives_and_param_count():
  layer = sp.BilateralLocalAttention(8, 2, window_size=2, cluster_size=4,
                                     overlap=2, rngs=nnx.Rngs(0))
  fs = layer.attn_c
  n = sum(a.size for a in jax.tree.leaves(nnx.state(fs, nnx.Param)))
  assert n == (8 * 24 + 24) + (9 * 8 + 8) + (8 * 8 + 8)

  @nnx.jit
  def run(layer, x):
    y = x + layer.attn(layer.norm1(x))
    fs = layer.attn_c
    qkv = fs.qkv(layer.norm_c(y)).reshape(1, 4, 4, 3, 2, 4)
    o = sp.feature_space_local_attention_reference(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], 4, overlap=2)
    o = o.reshape(x.shape) + fs.get_v(qkv[..., 2, :, :].reshape(x.shape))
    return layer(x), y + fs.proj(o)

  got, want = run(layer, normal(7, (1, 4, 4, 8)))
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="channels"):
    layer(jnp.zeros((1, 8, 4, 4)))
