"""Triplet attention, ELA and ULSAM: float64 definitions, references,
jit/vmap/grad, bf16, ULSAM masks, errors, modules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      dwconv64, normal)

X = normal(0, (2, 5, 6, 8))
sig = lambda z: 1 / (1 + np.exp(-z))


# ---- triplet -----------------------------------------------------------------
def _triplet64(x, kernels, scales, biases):
  x = np.asarray(x, np.float64)
  kernels = np.asarray(kernels, np.float64)
  maps = {  # Z-pool, then the 2D map with axes in conv order
      0: np.stack([x.max(1), x.mean(1)], -1).transpose(0, 2, 1, 3),  # [B, C, W, 2]
      1: np.stack([x.max(2), x.mean(2)], -1).transpose(0, 2, 1, 3),  # [B, C, H, 2]
      2: np.stack([x.max(3), x.mean(3)], -1),                        # [B, H, W, 2]
  }
  out = 0
  for i in range(3):
    a = sig(dwconv64(maps[i], kernels[i]).sum(-1) * float(scales[i])
            + float(biases[i]))
    if i == 0:
      out = out + x * a.transpose(0, 2, 1)[:, None]       # [B, 1, W, C]
    elif i == 1:
      out = out + x * a.transpose(0, 2, 1)[:, :, None]    # [B, H, 1, C]
    else:
      out = out + x * a[..., None]
  return out / 3


def test_triplet():
  ks, sc, bi = normal(1, (3, 3, 3, 2)), jnp.array([1.0, 0.5, 2.0]), normal(2, (3,))
  want = _triplet64(X, ks, sc, bi)
  for f in (sp.triplet_attention, sp.triplet_attention_reference):
    np.testing.assert_allclose(f(X, ks, sc, bi), want, atol=1e-5, rtol=1e-5)
  check_values_grads_jit_vmap(sp.triplet_attention,
                              sp.triplet_attention_reference, (X, ks, sc, bi),
                              batched=(0, 1, 2, 3))
  check_bf16(lambda x: sp.triplet_attention(x, ks, sc, bi),
             lambda x: sp.triplet_attention_reference(x, ks, sc, bi), (X,),
             batched=(0,))
  with pytest.raises(ValueError, match="kernels"):
    sp.triplet_attention(X, ks[:2], sc, bi)
  m = sp.TripletAttention(3, rngs=nnx.Rngs(0))
  m.bn_mean[...] = jnp.array([0.1, 0.2, 0.3])
  np.testing.assert_allclose(
      m(X), _triplet64(X, m.kernels[...], 1 / np.sqrt(1 + 1e-5) * np.ones(3),
                       -np.array([0.1, 0.2, 0.3]) / np.sqrt(1 + 1e-5)),
      atol=1e-5)


# ---- ELA ---------------------------------------------------------------------
def _ela64(x, kernel, scale, bias, groups):
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  k, c = kernel.shape

  def gate(desc):                                   # desc [B, L, C]
    b, l, _ = desc.shape
    y = np.zeros_like(desc)
    for i in range(k):
      for t in range(l):
        s = t + i - k // 2
        if 0 <= s < l:
          y[:, t] += kernel[i] * desc[:, s]
    g = y.reshape(b, l, groups, c // groups)
    g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-5)
    return sig(g.reshape(b, l, c) * np.asarray(scale) + np.asarray(bias))

  return x * gate(x.mean(2))[:, :, None] * gate(x.mean(1))[:, None]


def test_ela():
  kern, sc, bi = normal(3, (5, 8)), 1 + 0.1 * normal(4, (8,)), normal(5, (8,))
  want = _ela64(X, kern, sc, bi, 4)
  for f in (sp.efficient_local_attention, sp.efficient_local_attention_reference):
    np.testing.assert_allclose(f(X, kern, sc, bi, 4), want, atol=1e-5, rtol=1e-5)
  fn = lambda *a: sp.efficient_local_attention(*a, 4)
  ref = lambda *a: sp.efficient_local_attention_reference(*a, 4)
  check_values_grads_jit_vmap(fn, ref, (X, kern, sc, bi), batched=(0, 1, 2, 3))
  check_bf16(lambda x: fn(x, kern, sc, bi), lambda x: ref(x, kern, sc, bi),
             (X,), batched=(0,))
  with pytest.raises(ValueError, match="num_groups"):
    sp.efficient_local_attention(X, kern, sc, bi, 3)
  with pytest.raises(ValueError, match="kernel"):
    sp.efficient_local_attention(X, kern[:4], sc, bi, 4)
  m = sp.EfficientLocalAttention(8, 5, 4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(m(X), _ela64(X, m.kernel[...], np.ones(8),
                                          np.zeros(8), 4), atol=1e-5)


# ---- ULSAM -------------------------------------------------------------------
def _ulsam64(x, dws, dwb, pwk, pwb, g, mask):
  x = np.asarray(x, np.float64)
  b, h, w, c = x.shape
  mask = np.ones((b, h, w), bool) if mask is None else np.asarray(mask)
  out = x.copy()
  for bi in range(b):
    for gi in range(g):
      ch = slice(gi * c // g, (gi + 1) * c // g)
      y = x[bi, :, :, ch] * np.asarray(dws[ch]) + np.asarray(dwb[ch])
      pooled = np.zeros_like(y)
      for i in range(h):
        for j in range(w):
          nb = [y[a, e] for a in range(max(i - 1, 0), min(i + 2, h))
                for e in range(max(j - 1, 0), min(j + 2, w)) if mask[bi, a, e]]
          pooled[i, j] = np.max(nb, 0) if nb else 0.0
      logit = pooled @ np.asarray(pwk[ch], np.float64) + float(pwb[gi])
      valid = mask[bi]
      if valid.any():
        e = np.where(valid, np.exp(logit - logit[valid].max()), 0.0)
        a = e / e.sum()
      else:
        a = np.zeros_like(logit)
      out[bi, :, :, ch] = a[..., None] * np.where(valid[..., None], x[bi, :, :, ch], 0) \
          + x[bi, :, :, ch]
  return out


def _uargs():
  return (X, normal(6, (8,)), normal(7, (8,)), normal(8, (8,)), normal(9, (2,)))


def test_ulsam():
  args = _uargs()
  for mask in (None, jax.random.bernoulli(jax.random.key(10), 0.7, (2, 5, 6))):
    want = _ulsam64(*args, 2, mask)
    for f in (sp.ulsam, sp.ulsam_reference):
      np.testing.assert_allclose(f(*args, 2, mask=mask), want, atol=1e-5,
                                 rtol=1e-5)
  fn = lambda *a: sp.ulsam(*a, 2)
  ref = lambda *a: sp.ulsam_reference(*a, 2)
  check_values_grads_jit_vmap(fn, ref, args, batched=(0, 1, 2, 3, 4))
  check_bf16(lambda x: fn(x, *args[1:]), lambda x: ref(x, *args[1:]), (X,),
             batched=(0,))


def test_ulsam_masked_pixels():
  args = _uargs()
  m = np.ones((2, 5, 6), bool)
  m[0, 2, 3] = False
  m[1] = False
  m = jnp.asarray(m)
  xn = X.at[0, 2, 3].set(jnp.nan).at[1].set(jnp.inf)
  f = lambda x: sp.ulsam(x, *args[1:], 2, mask=m)
  out = f(xn)
  # valid pixels: unchanged by what masked pixels hold; masked pixels: x
  np.testing.assert_allclose(jnp.where(m[..., None], out, 0),
                             jnp.where(m[..., None], f(X), 0), atol=1e-6)
  np.testing.assert_array_equal(f(X)[1], X[1])
  g = jax.grad(lambda x: jnp.where(m[..., None], f(x), 0).sum())(xn)
  assert np.isfinite(np.asarray(g)).all()
  with pytest.raises(ValueError, match="pw_bias"):
    sp.ulsam(*args[:4], args[4][:1], 2)
  with pytest.raises(ValueError, match="mask"):
    sp.ulsam(*args, 2, mask=jnp.ones((2, 5), bool))
  mod = sp.ULSAM(8, 2, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(
      mod(X), _ulsam64(X, mod.dw_scale[...], mod.dw_bias[...], mod.pw_kernel[...],
                       mod.pw_bias[...], 2, None), atol=1e-5)
