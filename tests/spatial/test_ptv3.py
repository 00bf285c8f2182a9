"""PTv3 serialized point attention: curve codes (hand-computed Morton codes,
Hilbert adjacency), float64 patch definition, reference, jit/vmap/grad,
bf16, masks, errors, layer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)


def test_morton_codes_by_hand():
  pts = jnp.asarray([[[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1],
                      [2, 0, 0], [3, 2, 1]]], jnp.float32)
  # bit i of x -> 3i + 2, of y -> 3i + 1, of z -> 3i
  want = [0, 4, 2, 1, 7, 32, 4 + 32 + 16 + 1]
  np.testing.assert_array_equal(sp.serialize(pts, "z", 1.0, 3)[0], want)
  np.testing.assert_array_equal(sp.serialize(pts, "z-trans", 1.0, 3)[0],
                                [0, 2, 4, 1, 7, 16, 2 + 16 + 32 + 1])


@pytest.mark.parametrize("depth", [2, 3])
def test_hilbert_curve_is_a_unit_step_path(depth):
  side = 2 ** depth
  pts = np.array(list(itertools.product(range(side), repeat=3)), np.float32)
  for order in ("hilbert", "hilbert-trans"):
    c = np.asarray(sp.serialize(jnp.asarray(pts)[None], order, 1.0, depth))[0]
    assert sorted(c.tolist()) == list(range(side ** 3))     # a bijection
    seq = pts[np.argsort(c)]
    np.testing.assert_array_equal(np.abs(np.diff(seq, axis=0)).sum(1), 1.0)


def _inputs(n=11):
  coords = 3 * jax.random.uniform(jax.random.key(9), (2, n, 3))
  return (normal(0, (2, n, 4, 3)), normal(1, (2, n, 2, 3)),
          normal(2, (2, n, 2, 3)), coords)


@pytest.mark.parametrize("order,offset", [("z", 0), ("hilbert", 2)])
def test_matches_float64_definition(order, offset):
  q, k, v, coords = _inputs()
  km = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 11))
  codes = np.asarray(sp.serialize(coords, order, 0.5, 4))
  out = sp.serialized_attention(q, k, v, coords, 4, order=order, grid_size=0.5,
                                depth=4, patch_offset=offset, key_mask=km)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  for b in range(2):
    seq = sorted(range(11), key=lambda i: (codes[b, i], i))   # the curve
    patches = {}
    for r, i in enumerate(seq):
      patches.setdefault((r + offset) // 4, []).append(i)
    for members in patches.values():
      for i in members:
        for h in range(4):
          lg = np.array([qn[b, i, h] @ kn[b, j, h // 2] for j in members]) / np.sqrt(3)
          pr = softmax64(lg, np.asarray(km[b])[members])
          np.testing.assert_allclose(out[b, i, h], pr @ vn[b, members, h // 2],
                                     atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(
      out, sp.serialized_attention_reference(
          q, k, v, coords, 4, order=order, grid_size=0.5, depth=4,
          patch_offset=offset, key_mask=km), atol=2e-5)


def test_values_grads_jit_vmap_bf16():
  q, k, v, coords = _inputs()
  fn = lambda q, k, v: sp.serialized_attention(q, k, v, coords, 3,
                                               order="hilbert", grid_size=0.5)
  ref = lambda q, k, v: sp.serialized_attention_reference(
      q, k, v, coords, 3, order="hilbert", grid_size=0.5)
  check_values_grads_jit_vmap(fn, ref, (q, k, v))
  check_bf16(fn, ref, (q, k, v))


def test_masked_slots_errors_layer():
  q, k, v, coords = _inputs()
  km = np.ones((2, 11), bool)
  km[0, 3] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 3].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 3].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.serialized_attention(q, k, v, coords, 4, key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  with pytest.raises(ValueError, match="coords"):
    sp.serialized_attention(q, k, v, coords[..., :2], 4)
  with pytest.raises(ValueError, match="order"):
    sp.serialized_attention(q, k, v, coords, 4, order="peano")
  with pytest.raises(ValueError, match="patch_offset"):
    sp.serialized_attention(q, k, v, coords, 4, patch_offset=4)
  # one patch holding every point is full attention
  full = sp.serialized_attention(q, k, v, coords, 11)
  np.testing.assert_allclose(full, sp.subsampled_attention(
      q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0], atol=1e-5)
  layer = sp.SerializedAttention(8, 2, 4, order="z-trans", grid_size=0.5,
                                 rngs=nnx.Rngs(0))
  x = normal(5, (2, 11, 8))
  qkv = layer.qkv(x).reshape(2, 11, 3, 2, 4)
  want = sp.serialized_attention_reference(
      qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], coords, 4,
      order="z-trans", grid_size=0.5, scale=0.5)
  np.testing.assert_allclose(layer(x, coords),
                             layer.proj(want.reshape(x.shape)), atol=1e-5)
