"""DCAL global-local cross-attention: float64 definition, reference,
jit/vmap/grad, bf16, masks, errors, layer with rollout scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import analysis as an
from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

B, T, N, D = 2, 9, 4, 3


def _inputs():
  return (normal(0, (B, T, N, D)), normal(1, (B, T, 2, D)),
          normal(2, (B, T, 2, D)), normal(3, (B, T)))


def test_matches_float64_definition():
  q, k, v, s = _inputs()
  km = jax.random.bernoulli(jax.random.key(4), 0.7, (B, T))
  out, idx = sp.global_local_cross_attention(q, k, v, s, 3, key_mask=km)
  qn, kn, vn, sn = (np.asarray(x, np.float64) for x in (q, k, v, s))
  for b in range(B):
    top = sorted(range(T), key=lambda t: (-sn[b, t], t))[:3]
    np.testing.assert_array_equal(idx[b], top)
    for r, t in enumerate(top):
      for n in range(N):
        p = softmax64(D ** -0.5 * kn[b, :, n // 2] @ qn[b, t, n],
                      np.asarray(km[b]))
        np.testing.assert_allclose(out[b, r, n], p @ vn[b, :, n // 2],
                                   atol=2e-5, rtol=2e-5)
  ref, ridx = sp.global_local_cross_attention_reference(q, k, v, s, 3,
                                                        key_mask=km)
  np.testing.assert_allclose(out, ref, atol=2e-5)
  np.testing.assert_array_equal(idx, ridx)


def test_values_grads_jit_vmap_bf16():
  q, k, v, s = _inputs()
  fn = lambda q, k, v: sp.global_local_cross_attention(q, k, v, s, 4)[0]
  ref = lambda q, k, v: sp.global_local_cross_attention_reference(
      q, k, v, s, 4)[0]
  check_values_grads_jit_vmap(fn, ref, (q, k, v))
  check_bf16(fn, ref, (q, k, v))
  # no gradient flows to the scores (discrete selection)
  g = jax.grad(lambda s: sp.global_local_cross_attention(q, k, v, s, 4)[0].sum())(s)
  np.testing.assert_array_equal(g, 0.0)


def test_masked_slots_and_empty_rows():
  q, k, v, s = _inputs()
  km = np.ones((B, T), bool)
  km[0, 3] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 3].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 3].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.global_local_cross_attention(q, k, v, s, 3, key_mask=km)[0]
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_errors_and_layer():
  q, k, v, s = _inputs()
  with pytest.raises(ValueError, match="scores"):
    sp.global_local_cross_attention(q, k, v, s[:, :3], 2)
  with pytest.raises(ValueError, match="num_local"):
    sp.global_local_cross_attention(q, k, v, s, 0)
  with pytest.raises(ValueError, match="key_mask"):
    sp.global_local_cross_attention(q, k, v, s, 2, key_mask=jnp.ones((B,), bool))
  layer = sp.GlobalLocalCrossAttention(8, 2, local_ratio=0.3, rngs=nnx.Rngs(0))
  x = normal(5, (1, 10, 8))
  # scores from a rollout over two random layers' maps (DCAL's CLS row)
  maps = [jax.nn.softmax(normal(6 + i, (1, 2, 10, 10)), -1) for i in range(2)]
  scores = an.attention_rollout(maps)[:, 0]
  out, idx = layer(x, scores)
  assert out.shape == (1, 3, 8)
  qkv = layer.qkv(x).reshape(1, 10, 3, 2, 4)
  want, widx = sp.global_local_cross_attention_reference(
      qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], scores, 3,
      scale=0.5)
  np.testing.assert_array_equal(idx, widx)
  np.testing.assert_allclose(out, layer.proj(want.reshape(1, 3, 8)), atol=1e-5)
