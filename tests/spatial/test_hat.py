"""HAT overlapping cross-attention: float64 definition (HAT's unfold
windows and index), reference, jit/vmap/grad, bf16, masks, errors, layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

M, MO = 2, 4
SHAPE = (2, 5, 6, 2, 3)


def _ocab64(q, k, v, rpb, key_mask, scale):
  q, k, v, rpb = (np.asarray(x, np.float64) for x in (q, k, v, rpb))
  b_, h, w, n, _ = q.shape
  p = (MO - M) // 2
  out = np.zeros(q.shape)
  for bi in range(b_):
    for y in range(h):
      for x in range(w):
        y0, x0 = (y // M) * M - p, (x // M) * M - p
        keys = [(ky, kx) for ky in range(y0, y0 + MO) for kx in range(x0, x0 + MO)
                if 0 <= ky < h and 0 <= kx < w]
        for hd in range(n):
          lg = [scale * q[bi, y, x, hd] @ k[bi, ky, kx, hd]
                + rpb[hd, y % M - (ky - y0) + MO - 1, x % M - (kx - x0) + MO - 1]
                for ky, kx in keys]
          ok = [bool(key_mask[bi, ky, kx]) for ky, kx in keys]
          pr = softmax64(np.array(lg), np.array(ok))
          out[bi, y, x, hd] = pr @ np.array([v[bi, ky, kx, hd] for ky, kx in keys])
  return out


def _inputs():
  return (normal(0, SHAPE), normal(1, SHAPE), normal(2, SHAPE),
          normal(3, (2, M + MO - 1, M + MO - 1)))


def test_matches_float64_definition():
  q, k, v, rpb = _inputs()
  km = jax.random.bernoulli(jax.random.key(4), 0.8, SHAPE[:3])
  want = _ocab64(q, k, v, rpb, np.asarray(km), 3 ** -0.5)
  for f in (sp.overlapping_cross_attention,
            sp.overlapping_cross_attention_reference):
    np.testing.assert_allclose(f(q, k, v, M, MO, rpb=rpb, key_mask=km), want,
                               atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap_bf16():
  q, k, v, rpb = _inputs()
  fn = lambda q, k, v, r: sp.overlapping_cross_attention(q, k, v, M, MO, rpb=r)
  ref = lambda q, k, v, r: sp.overlapping_cross_attention_reference(
      q, k, v, M, MO, rpb=r)
  check_values_grads_jit_vmap(fn, ref, (q, k, v, rpb), batched=(0, 1, 2, 3))
  check_bf16(lambda q, k, v: fn(q, k, v, rpb.astype(q.dtype)),
             lambda q, k, v: ref(q, k, v, rpb), (q, k, v))


def test_masked_slots_and_empty_rows():
  q, k, v, _ = _inputs()
  km = np.ones(SHAPE[:3], bool)
  km[0, 1, 2] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.overlapping_cross_attention(q, k, v, M, MO, key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_errors_and_layer():
  q, k, v, rpb = _inputs()
  with pytest.raises(ValueError, match="overlap_size"):
    sp.overlapping_cross_attention(q, k, v, 2, 3)
  with pytest.raises(ValueError, match="rpb.*\\(2, 5, 5\\)"):
    sp.overlapping_cross_attention(q, k, v, 2, 4, rpb=rpb[:, :3, :3])
  assert sp.overlap_window_size(16, 0.5) == 24            # HAT's default
  with pytest.raises(ValueError, match="even"):
    sp.overlap_window_size(4, 0.25)
  layer = sp.OverlappingCrossAttention(8, 2, 2, overlap_ratio=1.0,
                                       rngs=nnx.Rngs(0))
  assert layer.overlap_size == 4
  assert layer.relative_position_bias_table.shape == (25, 2)
  x = normal(5, (1, 5, 6, 8))
  # layer and reference in one compiled program (eager, each op was compiled
  # on its own)
  @nnx.jit
  def got_want(layer, x):
    qkv = layer.qkv(x).reshape(1, 5, 6, 3, 2, 4)
    want = sp.overlapping_cross_attention_reference(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], 2, 4,
        rpb=layer.relative_position_bias(), scale=0.5)
    return layer(x), layer.proj(want.reshape(x.shape))

  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)
