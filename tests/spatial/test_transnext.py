"""TransNeXt aggregated attention: float64 definition (the official unfold
formulation, one pixel at a time), reference, jit/vmap/grad, bf16, key
masks, errors, layer pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

B, H, W, N, D, P, KW = 2, 4, 5, 2, 3, 4, 3


def _args():
  kk = KW * KW
  return dict(
      q=normal(0, (B, H, W, N, D)), k=normal(1, (B, H, W, N, D)),
      v=normal(2, (B, H, W, N, D)), kp=normal(3, (B, P, N, D)),
      vp=normal(4, (B, P, N, D)), qe=0.3 * normal(5, (N, D)),
      temp=jnp.array([1.5, 0.7]), lb=normal(6, (N, kk)),
      pb=normal(7, (1, N, H * W, P)), tok=0.2 * normal(8, (N, D, kk)),
      tb=0.1 * normal(9, (N, kk)))


def _kw(a):
  return dict(query_embedding=a["qe"], temperature=a["temp"],
              local_bias=a["lb"], pool_bias=a["pb"], learnable_tokens=a["tok"],
              learnable_bias=a["tb"])


def _transnext64(a, key_mask):
  """Official formulation: zero-padded unfold, -inf on padding, length scale
  log(#in-image neighbours + P), learnable tokens on the local weights."""
  g = {k: np.asarray(x, np.float64) for k, x in a.items()}
  nrm = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  km = np.ones((B, H, W), bool) if key_mask is None else np.asarray(key_mask)
  out = np.zeros((B, H, W, N, D))
  r = KW // 2
  for b in range(B):
    for y in range(H):
      for x in range(W):
        cnt = sum(0 <= y + i - r < H and 0 <= x + j - r < W
                  for i in range(KW) for j in range(KW))
        for n in range(N):
          qn = nrm(g["q"][b, y, x, n])
          qs = (qn + g["qe"][n]) * g["temp"][n] * np.log(cnt + P)
          lg, ok, vs = [], [], []
          for i in range(KW):
            for j in range(KW):
              yy, xx = y + i - r, x + j - r
              inside = 0 <= yy < H and 0 <= xx < W
              kv = (nrm(g["k"][b, yy, xx, n]), g["v"][b, yy, xx, n]) if inside \
                  else (np.zeros(D), np.zeros(D))
              lg.append(qs @ kv[0] + g["lb"][n, i * KW + j])
              ok.append(inside and km[b, yy, xx])
              vs.append(kv[1] if ok[-1] else np.zeros(D))
          for p in range(P):
            lg.append(qs @ nrm(g["kp"][b, p, n]) + g["pb"][0, n, y * W + x, p])
            ok.append(True)
          pr = softmax64(np.array(lg), np.array(ok))
          wl = pr[:KW * KW] + qn @ g["tok"][n] + g["tb"][n]
          out[b, y, x, n] = wl @ np.array(vs) + pr[KW * KW:] @ g["vp"][b, :, n]
  return out


def test_matches_float64_definition():
  a = _args()
  km = jax.random.bernoulli(jax.random.key(10), 0.7, (B, H, W))
  want = _transnext64(a, km)
  for f in (sp.aggregated_attention, sp.aggregated_attention_reference):
    got = f(a["q"], a["k"], a["v"], a["kp"], a["vp"], KW, key_mask=km, **_kw(a))
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=3e-5)


def test_values_grads_jit_vmap():
  a = _args()
  kw = _kw(a)
  fn = lambda q, k, v, kp, vp: sp.aggregated_attention(q, k, v, kp, vp, KW, **kw)
  ref = lambda q, k, v, kp, vp: sp.aggregated_attention_reference(
      q, k, v, kp, vp, KW, **kw)
  check_values_grads_jit_vmap(fn, ref, (a["q"], a["k"], a["v"], a["kp"], a["vp"]),
                              batched=(0, 1, 2, 3, 4), atol=5e-5)


def test_bfloat16():
  a = _args()
  kw = _kw(a)
  check_bf16(lambda q, k, v: sp.aggregated_attention(q, k, v, a["kp"], a["vp"],
                                                     KW, **kw),
             lambda q, k, v: sp.aggregated_attention_reference(
                 q, k, v, a["kp"], a["vp"], KW, **kw), (a["q"], a["k"], a["v"]),
             atol=1e-1)


def test_masked_local_slots_never_reach_output():
  a = _args()
  km = np.ones((B, H, W), bool)
  km[0, 1, 2] = False
  km[1] = False              # only pooled tokens remain for batch 1
  km = jnp.asarray(km)
  kn = a["k"].at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = a["v"].at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.aggregated_attention(a["q"], k, v, a["kp"], a["vp"], KW,
                                           key_mask=km, **_kw(a))
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(a["k"], a["v"]), atol=1e-6)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  np.testing.assert_array_equal(g[1][1], 0.0)


def test_errors():
  a = _args()
  q, k, v, kp, vp = a["q"], a["k"], a["v"], a["kp"], a["vp"]
  with pytest.raises(ValueError, match="window_size"):
    sp.aggregated_attention(q, k, v, kp, vp, 2)
  with pytest.raises(ValueError, match="key_pool"):
    sp.aggregated_attention(q, k, v, kp[..., :2], vp, 3)
  with pytest.raises(ValueError, match="local_bias.*\\(2, 9\\)"):
    sp.aggregated_attention(q, k, v, kp, vp, 3, local_bias=jnp.zeros((2, 8)))
  with pytest.raises(ValueError, match="pool_bias"):
    sp.aggregated_attention(q, k, v, kp, vp, 3, pool_bias=jnp.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="key_mask"):
    sp.aggregated_attention(q, k, v, kp, vp, 3, key_mask=jnp.ones((B, H), bool))


def test_adaptive_pool_and_relative_coords():
  x = jnp.arange(5.0).reshape(1, 5, 1, 1)
  np.testing.assert_allclose(sp.adaptive_avg_pool(x, (2, 1))[0, :, 0, 0],
                             [1.0, 3.0])       # bins [0, 3), [2, 5)
  idx, table = sp.pool_relative_coords((4, 4), (2, 2))
  assert idx.shape == (16, 4)
  # query (0, 0) vs pooled centre (0.5, 0.5): offset -0.5 / 3 * 8 per axis.
  o = -0.5 / 3 * 8
  want = np.sign(o) * np.log2(abs(o) + 1) / 3
  np.testing.assert_allclose(table[idx[0, 0]], [want, want], rtol=1e-6)


def test_layer_matches_primitive():
  layer = sp.AggregatedAttention(16, 2, window_size=3, pool_size=2,
                                 rngs=nnx.Rngs(0))
  x = normal(11, (1, 4, 5, 16))
  np.testing.assert_allclose(jax.nn.softplus(layer.temperature[...]), 1 / 0.24,
                             rtol=1e-5)

  # layer and reference each compiled as one program (eager, each op was
  # compiled on its own)
  @nnx.jit
  def got_want(layer, x):
    q = layer.q(x).reshape(1, 4, 5, 2, 8)
    kv = layer.kv(x).reshape(1, 4, 5, 2, 2, 8)
    kvp = layer.kv(layer.pooled_tokens(x)).reshape(1, 4, 2, 2, 8)
    want = sp.aggregated_attention_reference(
        q, kv[..., 0, :, :], kv[..., 1, :, :], kvp[:, :, 0], kvp[:, :, 1], 3,
        query_embedding=layer.query_embedding[...],
        temperature=jax.nn.softplus(layer.temperature[...]),
        local_bias=layer.relative_pos_bias_local[...],
        pool_bias=layer.pool_bias((4, 5))[None],
        learnable_tokens=layer.learnable_tokens[...],
        learnable_bias=layer.learnable_bias[...])
    return layer(x), layer.proj(want.reshape(x.shape))

  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)
