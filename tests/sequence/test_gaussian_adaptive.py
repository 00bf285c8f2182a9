"""Gaussian adaptive attention (GAAM) vs a float64 NumPy evaluation of the
authors' DAAM formula; causal prefix statistics, masks, masked-slot
invariance, grads, bf16, vmap, errors, the layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import gaussian_adaptive as gaam

B, T, N, H = 2, 9, 3, 4


def _np_gaam(x, delta, c, keep=None, causal=False, eps=1e-5):
  x = np.asarray(x, np.float64)
  delta = np.asarray(delta, np.float64).reshape(N, -1)
  c = np.asarray(c, np.float64).reshape(N, -1)
  b, t = x.shape[:2]
  keep = np.ones((b, t), bool) if keep is None else np.asarray(keep)
  out = np.zeros_like(x)
  for bi in range(b):
    for ti in range(t):
      if not keep[bi, ti]:
        continue
      sel = keep[bi] & ((np.arange(t) <= ti) if causal else True)
      xs = x[bi, sel]
      mu = xs.mean(0)
      var = abs((xs ** 2).mean(0) - mu ** 2) + 1e-8
      y = (x[bi, ti] - (mu + delta)) / np.sqrt(var + eps)
      out[bi, ti] = x[bi, ti] * np.exp(-(y ** 2) / (2 * c))
  return out


def _data(seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = 1.5 * jax.random.normal(ks[0], (B, T, N, H)) + 0.5
  return (x.astype(dtype), 0.3 * jax.random.normal(ks[1], (N, H)),
          1.0 + jax.random.uniform(ks[2], (N, H)))


KEEP = jnp.arange(T)[None, :] < jnp.array([6, 0])[:, None]


def test_matches_float64_all_variants():
  x, d, c = _data()
  f = jax.jit(gaam.gaussian_adaptive_attention, static_argnames="is_causal")
  for causal in (False, True):
    for keep in (None, KEEP):
      got = f(x, d, c, mask=keep, is_causal=causal)
      want = _np_gaam(x, d, c, keep, causal)
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(
          gaam.gaussian_adaptive_attention_reference(
              x, d, c, mask=keep, is_causal=causal), want, rtol=2e-5,
          atol=2e-5)
  np.testing.assert_array_equal(got[1], 0.0)
  # per-head parameters ([N]) broadcast over the head's features
  np.testing.assert_allclose(
      gaam.gaussian_adaptive_attention(x, d[:, 0], c[:, 0]),
      _np_gaam(x, np.repeat(d[:, :1], H, 1), np.repeat(c[:, :1], H, 1)),
      rtol=2e-5, atol=2e-5)
  g = gaam.gaussian_adaptive_weights(x, d, c)
  assert float(g.min()) >= 0 and float(g.max()) <= 1
  # causal: position t does not depend on later positions
  x2 = x.at[:, 5:].set(4.0)
  np.testing.assert_allclose(f(x2, d, c, is_causal=True)[:, :5],
                             f(x, d, c, is_causal=True)[:, :5], rtol=1e-6)


def test_grads_and_masked_slot_invariance():
  x, d, c = _data(1)
  keep = jnp.arange(T)[None, :] < jnp.array([6, 3])[:, None]
  w = jax.random.normal(jax.random.key(4), x.shape)

  def loss(fn, x, d, c):
    return jnp.sum(fn(x, d, c, mask=keep, is_causal=True) * w)

  g = jax.jit(jax.value_and_grad(
      functools.partial(loss, gaam.gaussian_adaptive_attention),
      argnums=(0, 1, 2)))
  val, g1 = g(x, d, c)
  g2 = jax.grad(functools.partial(
      loss, gaam.gaussian_adaptive_attention_reference), argnums=(0, 1, 2))(
          x, d, c)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for poison in (np.nan, np.inf, -np.inf):
    xp = jnp.where(keep[:, :, None, None], x, poison)
    val2, g3 = g(xp, d, c)
    np.testing.assert_array_equal(val2, val)
    for a, b in zip(g3, g1):
      np.testing.assert_array_equal(a, b)
    assert not np.any(g3[0][~np.asarray(keep)])


def test_bf16_vmap_errors_and_layer():
  x, d, c = _data(2)
  got = gaam.gaussian_adaptive_attention(x.astype(jnp.bfloat16), d, c)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      got.astype(jnp.float32),
      _np_gaam(x.astype(jnp.bfloat16).astype(jnp.float32), d, c),
      atol=5e-2, rtol=5e-2)
  f = functools.partial(gaam.gaussian_adaptive_attention, mean_offset=d, c=c)
  np.testing.assert_allclose(jax.vmap(f)(x), f(x), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r"`c`.*\[3, 4\].*\(4, 4\)"):
    gaam.gaussian_adaptive_attention(x, d, jnp.ones((4, 4)))
  with pytest.raises(ValueError, match=r"`mask`.*\[2, 9\]"):
    gaam.gaussian_adaptive_attention(x, d, c, mask=KEEP[:, :5])
  with pytest.raises(ValueError, match=r"`x`.*\(9, 12\)"):
    gaam.gaussian_adaptive_attention(x[0].reshape(T, -1), d, c)
  layer = gaam.GaussianAdaptiveAttention(12, N, rngs=nnx.Rngs(0))
  xs = x.reshape(B, T, -1)
  y = nnx.jit(lambda m, x: m(x, mask=KEEP))(layer, xs)
  want = _np_gaam(x, np.zeros((N, H)), np.full((N, H), 2.0), KEEP)
  np.testing.assert_allclose(y, want.reshape(B, T, -1), rtol=2e-5, atol=2e-5)
  gr = nnx.grad(lambda m: jnp.sum(m(xs) ** 2))(layer)
  assert float(jnp.max(jnp.abs(gr.c.value))) > 0
  assert float(jnp.max(jnp.abs(gr.mean_offset.value))) > 0
