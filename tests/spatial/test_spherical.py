"""Attention on the sphere: quadrature rules against analytic integrals,
convergence of the attention to the spherical integral, float64 formula,
reference, jit/vmap/grad, bf16, masks, errors, layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal)


@pytest.mark.parametrize("grid", ["equiangular", "legendre-gauss"])
def test_quadrature_integrates_polynomials(grid):
  nlat, nlon = 9, 8
  w = sp.sphere_quadrature_weights(nlat, nlon, grid)
  th = sp.sphere_grid(nlat, grid)[:, None]
  ph = 2 * np.pi * np.arange(nlon)[None] / nlon
  np.testing.assert_allclose(w.sum(), 4 * np.pi, rtol=1e-12)
  # int cos^2(theta) = 4 pi / 3; int sin^2(theta) cos^2(phi) = 4 pi / 3
  np.testing.assert_allclose((w * np.cos(th) ** 2).sum(), 4 * np.pi / 3,
                             rtol=1e-12)
  np.testing.assert_allclose((w * (np.sin(th) * np.cos(ph)) ** 2).sum(),
                             4 * np.pi / 3, rtol=1e-12)
  # int z^4 = 4 pi / 5
  np.testing.assert_allclose((w * np.cos(th) ** 4).sum(), 4 * np.pi / 5,
                             rtol=1e-12)


def test_converges_to_the_spherical_integral():
  """q(x) = (0, 0, 1) for every x, k(y) = (x, y, z)(y), v(y) = z: out =
  int e^{b z} z / int e^{b z} = coth(b) - 1/b. Weighted attention converges
  to it; plain (unweighted) attention over the pixels does not."""
  b = 2.0
  want = 1 / np.tanh(b) - 1 / b
  errs, plain = [], []
  for nlat in (9, 17, 33):
    nlon = 2 * nlat
    th = sp.sphere_grid(nlat)[:, None] * np.ones((1, nlon))
    ph = 2 * np.pi * np.arange(nlon)[None] / nlon * np.ones((nlat, 1))
    xyz = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph),
                    np.cos(th)], -1)
    k = jnp.asarray(xyz, jnp.float32)[None, :, :, None]
    q = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0]), k.shape)
    v = k[..., 2:]
    out = sp.spherical_attention(q, k, v, scale=b)
    errs.append(abs(float(out[0, 0, 0, 0, 0]) - want))
    flat = sp.spherical_attention(q, k, v, scale=b,
                                  quad_weights=jnp.ones((nlat, nlon)))
    plain.append(abs(float(flat[0, 0, 0, 0, 0]) - want))
  assert max(errs) < 5e-5          # float32 round-off (2e-7 .. 7e-6 measured)
  assert min(plain) > 0.05            # the poles are over-weighted


def test_matches_float64_formula_and_reference():
  q, k, v = normal(0, (2, 5, 6, 2, 3)), normal(1, (2, 5, 6, 1, 3)), normal(2, (2, 5, 6, 1, 3))
  km = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 5, 6))
  w = sp.sphere_quadrature_weights(5, 6)
  qn, kn, vn = (np.asarray(x, np.float64).reshape(2, 30, -1, 3) for x in (q, k, v))
  wn = w.reshape(-1) * np.asarray(km).reshape(2, 30)
  s = np.einsum("btnd,bsd->bnts", qn, kn[:, :, 0]) / np.sqrt(3)
  e = np.exp(s - s.max(-1, keepdims=True)) * wn[:, None, None]
  want = np.einsum("bnts,bsd->btnd", e / e.sum(-1, keepdims=True), vn[:, :, 0])
  for f in (sp.spherical_attention, sp.spherical_attention_reference):
    np.testing.assert_allclose(np.asarray(f(q, k, v, key_mask=km)).reshape(want.shape),
                               want, atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap_bf16():
  q, k, v = (normal(i, (2, 4, 6, 2, 3)) for i in range(3))
  for grid in ("equiangular", "legendre-gauss"):
    fn = lambda q, k, v: sp.spherical_attention(q, k, v, grid=grid)
    ref = lambda q, k, v: sp.spherical_attention_reference(q, k, v, grid=grid)
    check_values_grads_jit_vmap(fn, ref, (q, k, v))
  check_bf16(sp.spherical_attention, sp.spherical_attention_reference, (q, k, v))


def test_masked_slots_errors_layer():
  q, k, v = (normal(i, (2, 4, 6, 2, 3)) for i in range(3))
  km = np.ones((2, 4, 6), bool)
  km[0, 1, 2] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.spherical_attention(q, k, v, key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  with pytest.raises(ValueError, match="quad_weights.*\\(4, 6\\)"):
    sp.spherical_attention(q, k, v, quad_weights=jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="grid"):
    sp.spherical_attention(q, k, v, grid="healpix")
  layer = sp.SphericalAttention(8, 2, rngs=nnx.Rngs(0))
  x = normal(5, (1, 4, 6, 8))
  # layer and reference in one compiled program (eager, each op was compiled
  # on its own)
  @nnx.jit
  def got_want(layer, x):
    qkv = layer.qkv(x).reshape(1, 4, 6, 3, 2, 4)
    want = sp.spherical_attention_reference(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], scale=0.5)
    return layer(x), layer.proj(want.reshape(x.shape))

  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)
