"""CoaT factorized attention + CRPE: float64 definition, reference,
jit/vmap/grad, bf16, key masks, errors, layer (mixed head windows)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal)

SHAPE = (2, 5, 6, 4, 3)


def _inputs(kvh=2):
  b, h, w, n, d = SHAPE
  return (normal(0, SHAPE), normal(1, (b, h, w, kvh, d)),
          normal(2, (b, h, w, kvh, d)), normal(3, (3, 5, n, d)),
          normal(4, (n, d)))


def _coat64(q, k, v, kern, bias, key_mask, scale):
  """The paper's formula in float64 NumPy, the conv one output pixel at a
  time with explicit zero padding."""
  q, k, v, kern, bias = (np.asarray(x, np.float64) for x in (q, k, v, kern, bias))
  b, h, w, n, d = q.shape
  rep = n // k.shape[-2]
  k, v = np.repeat(k, rep, -2), np.repeat(v, rep, -2)
  valid = np.ones((b, h, w), bool) if key_mask is None else np.asarray(key_mask)
  v = np.where(valid[..., None, None], v, 0.0)
  out = np.zeros_like(q)
  kh, kw = kern.shape[:2]
  for bi in range(b):
    for hd in range(n):
      kk = k[bi, :, :, hd].reshape(h * w, d)
      vv = v[bi, :, :, hd].reshape(h * w, d)
      m = valid[bi].ravel()
      e = np.exp(kk - kk[m].max(0)) * m[:, None]
      ks = e / e.sum(0)
      ctx = ks.T @ vv
      out[bi, :, :, hd] = scale * (q[bi, :, :, hd].reshape(-1, d) @ ctx).reshape(
          h, w, d)
      for y in range(h):
        for x in range(w):
          c = bias[hd].copy()
          for i in range(kh):
            for j in range(kw):
              yy, xx = y + i - kh // 2, x + j - kw // 2
              if 0 <= yy < h and 0 <= xx < w:
                c += kern[i, j, hd] * v[bi, yy, xx, hd]
          out[bi, y, x, hd] += q[bi, y, x, hd] * c
  return out


def test_matches_float64_definition():
  q, k, v, kern, bias = _inputs()
  km = jax.random.bernoulli(jax.random.key(5), 0.7, SHAPE[:3])
  want = _coat64(q, k, v, kern, bias, km, 3 ** -0.5)
  for f in (sp.factorized_attention, sp.factorized_attention_reference):
    np.testing.assert_allclose(f(q, k, v, crpe_kernel=kern, crpe_bias=bias,
                                 key_mask=km), want, atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap():
  q, k, v, kern, bias = _inputs()
  fn = lambda q, k, v, kern, bias: sp.factorized_attention(
      q, k, v, crpe_kernel=kern, crpe_bias=bias)
  ref = lambda q, k, v, kern, bias: sp.factorized_attention_reference(
      q, k, v, crpe_kernel=kern, crpe_bias=bias)
  check_values_grads_jit_vmap(fn, ref, (q, k, v, kern, bias),
                              batched=(0, 1, 2, 3, 4))
  # No CRPE, 3 spatial dims, value head dim differs.
  q3, k3 = normal(6, (1, 2, 3, 4, 2, 3)), normal(7, (1, 2, 3, 4, 2, 3))
  v3 = normal(8, (1, 2, 3, 4, 2, 5))
  check_values_grads_jit_vmap(sp.factorized_attention,
                              sp.factorized_attention_reference, (q3, k3, v3))


def test_bfloat16():
  q, k, v, kern, bias = _inputs()
  check_bf16(lambda q, k, v: sp.factorized_attention(
      q, k, v, crpe_kernel=kern.astype(q.dtype), crpe_bias=bias),
             lambda q, k, v: sp.factorized_attention_reference(
                 q, k, v, crpe_kernel=kern, crpe_bias=bias), (q, k, v),
             atol=1.5e-1)


def test_masked_slots_and_all_masked():
  q, k, v, kern, _ = _inputs(kvh=4)
  km = np.ones(SHAPE[:3], bool)
  km[0, 1, 2] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.factorized_attention(q, k, v, crpe_kernel=kern,
                                           key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  np.testing.assert_array_equal(g[1][0, 1, 2], 0.0)


def test_errors():
  q, k, v, kern, bias = _inputs()
  with pytest.raises(ValueError, match="crpe_kernel.*\\(2, 5, 4, 3\\)"):
    sp.factorized_attention(q, k, v, crpe_kernel=jnp.zeros((2, 5, 4, 3)))
  with pytest.raises(ValueError, match="crpe_bias"):
    sp.factorized_attention(q, k, v, crpe_kernel=kern, crpe_bias=bias[:2])
  with pytest.raises(ValueError, match="key_mask"):
    sp.factorized_attention(q, k, v, key_mask=jnp.ones((2, 5), bool))
  with pytest.raises(ValueError, match="value.*head_dim"):
    sp.factorized_attention(q, k, jnp.zeros(SHAPE[:-2] + (2, 4)),
                            crpe_kernel=kern)
  with pytest.raises(ValueError, match="2 spatial dims"):
    sp.factorized_attention(q[:, 0], k[:, 0], v[:, 0], crpe_kernel=kern)


def test_layer_mixed_windows():
  layer = sp.FactorizedAttention(32, 8, rngs=nnx.Rngs(0))   # {3: 2, 5: 3, 7: 3}
  n = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n == 32 * 96 + 32 * 32 + 32 + (9 + 1) * 8 + (25 + 1) * 12 + (49 + 1) * 12
  x = normal(9, (1, 5, 6, 32))
  # layer and reference in one compiled program (eager, each op was compiled
  # on its own)
  @nnx.jit
  def got_want(layer, x):
    qkv = layer.qkv(x).reshape(1, 5, 6, 3, 8, 4)
    q, k, v = (qkv[..., i, :, :] for i in range(3))
    # CoaT: head group g convolved with its own window, then q * conv.
    want = sp.factorized_attention_reference(q, k, v, scale=0.5)
    start = 0
    for w, hh in layer.windows.items():
      kern = getattr(layer, f"crpe_kernel_{w}")[...].reshape(w, w, hh, 4)
      bias = getattr(layer, f"crpe_bias_{w}")[...].reshape(hh, 4)
      sl = slice(start, start + hh)
      part = sp.factorized_attention_reference(
          q[..., sl, :], k[..., sl, :], v[..., sl, :], crpe_kernel=kern,
          crpe_bias=bias, scale=0.5)
      want = want.at[..., sl, :].set(part)
      start += hh
    return layer(x), layer.proj(want.reshape(x.shape))

  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)
