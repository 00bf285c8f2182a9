"""Fused neighborhood attention kernels (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import neighborhood as nb

try:
  from attnjax import neighborhood_attention as attnjax_na
except ImportError:  # spatial family not available
  attnjax_na = None


def _rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


CASES = {
    # name: (dtype, q shape, kv heads, kwargs, tile)
    "1d_dilated_gqa_f32": (jnp.float32, (2, 23, 4, 8), 2,
                           dict(kernel_size=5, dilation=2), (8,)),
    "2d_dilated_strided_f32": (jnp.float32, (1, 11, 13, 2, 8), 2,
                               dict(kernel_size=(3, 5), dilation=(2, 1),
                                    stride=(1, 3)), (4, 4)),
    "2d_causal_row_bf16": (jnp.bfloat16, (1, 9, 10, 2, 8), 1,
                           dict(kernel_size=(3, 4), is_causal=(True, False),
                                dilation=(1, 2)), (2, 4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_and_grads_vs_reference(name):
  dtype, shape, kh, kw, tile = CASES[name]
  kshape = shape[:-2] + (kh, shape[-1])
  q, k, v = _rand(0, shape, dtype), _rand(1, kshape, dtype), _rand(
      2, kshape, dtype)
  dout = _rand(3, shape)
  f32 = lambda x: x.astype(jnp.float32)
  kern = lambda q, k, v: nb.neighborhood_attention(q, k, v, tile_size=tile,
                                                   **kw)
  out = kern(q, k, v)
  ref = nb.neighborhood_attention_reference(f32(q), f32(k), f32(v), **kw)
  assert out.dtype == dtype and out.shape == shape
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol,
                             rtol=tol)
  if attnjax_na is not None:
    other = attnjax_na(f32(q), f32(k), f32(v), **kw)
    np.testing.assert_allclose(np.asarray(out, np.float32), other, atol=tol,
                               rtol=tol)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)
                                            * dout)
  g = jax.jit(jax.grad(loss(kern), (0, 1, 2)))(q, k, v)
  gr = jax.grad(loss(lambda q, k, v: nb.neighborhood_attention_reference(
      q, k, v, **kw)), (0, 1, 2))(f32(q), f32(k), f32(v))
  for a, b in zip(g, gr):
    assert a.dtype == dtype
    assert _rel(a, b) < (1e-4 if dtype == jnp.float32 else 5e-2)


def test_3d_kernel_values_lse_and_grads_vs_float64():
  """The fused 3D kernel (stride, dilation, a causal axis, GQA, ragged tiles)
  against the float64 NATTEN oracle: output and log-sum-exp; gradients of
  sum(out * co) + sum(lse * cl) against the dense plain-jnp reference; then
  bfloat16 values with the default tiles."""
  from attnjax.spatial.neighborhood import neighborhood_attention_reference
  from tests.spatial.test_neighborhood_features import oracle
  kw = dict(kernel_size=(3, 2, 3), stride=(2, 1, 3), dilation=(1, 2, 1),
            is_causal=(False, True, False))
  q = _rand(0, (1, 4, 5, 6, 4, 8))
  k, v = _rand(1, (1, 4, 5, 6, 2, 8)), _rand(2, (1, 4, 5, 6, 2, 8))
  kern = lambda q, k, v: nb.neighborhood_attention(
      q, k, v, tile_size=(2, 2, 4), return_lse=True, **kw)
  out, lse = jax.jit(kern)(q, k, v)
  want_out, want_lse = oracle(q, k, v, kw["kernel_size"], kw["stride"],
                              kw["dilation"], kw["is_causal"])
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
  co, cl = _rand(3, out.shape), _rand(4, lse.shape)
  loss = lambda fn: lambda q, k, v: (lambda o, l: jnp.sum(o * co) + jnp.sum(
      l * cl))(*fn(q, k, v))
  g = jax.jit(jax.grad(loss(kern), (0, 1, 2)))(q, k, v)
  gr = jax.grad(loss(lambda q, k, v: neighborhood_attention_reference(
      q, k, v, return_lse=True, **kw)), (0, 1, 2))(q, k, v)
  for a, b in zip(g, gr):
    assert _rel(a, b) < 1e-5
  bf = lambda x: x.astype(jnp.bfloat16)
  out = nb.neighborhood_attention(bf(q), bf(k), bf(v), **kw)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out,
                             atol=3e-2, rtol=3e-2)


def test_through_the_op_with_additional_tokens_and_lse():
  """attnjax's neighborhood_attention with NeighborhoodPallas: stride,
  extra tokens merged through the kernel's lse, vs the float64 oracle;
  gradient through the merge vs the dense reference."""
  from attnjax.spatial.neighborhood import (NeighborhoodPallas,
                                            neighborhood_attention,
                                            neighborhood_attention_reference)
  from tests.spatial.test_neighborhood_features import oracle
  q, k, v = (_rand(i, (1, 19, 2, 8)) for i in range(3))
  ak, av = _rand(3, (1, 3, 2, 8)), _rand(4, (1, 3, 2, 8))
  kw = dict(stride=2, additional_keys=ak, additional_values=av,
            return_lse=True)
  fn = lambda q: neighborhood_attention(
      q, k, v, 5, implementation=NeighborhoodPallas(tile_size=8), **kw)
  out, lse = jax.jit(fn)(q)
  want_out, want_lse = oracle(q, k, v, 5, 2, ak=ak, av=av)
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
  loss = lambda f: lambda q: (lambda o, l: jnp.sum(jnp.sin(o)) + jnp.sum(
      l))(*f(q))
  g = jax.jit(jax.grad(loss(fn)))(q)
  gr = jax.grad(loss(lambda q: neighborhood_attention_reference(
      q, k, v, 5, **kw)))(q)
  assert _rel(g, gr) < 1e-5


def test_only_reachable_tiles_are_visited():
  # 1D, L=64, K=3, tiles of 8: query tiles 0-1 reach key tiles 0-2 only, so
  # NaNs planted in values from position 24 on never reach them (a dense
  # kernel that masked instead of skipping would propagate 0 * NaN = NaN).
  q, k, v = _rand(4, (1, 64, 1, 8)), _rand(5, (1, 64, 1, 8)), _rand(
      6, (1, 64, 1, 8))
  out = nb.neighborhood_attention(q, k, v.at[:, 24:].set(jnp.nan), 3,
                                  tile_size=8)
  ref = nb.neighborhood_attention_reference(q, k, v, 3)
  np.testing.assert_allclose(out[:, :16], ref[:, :16], atol=1e-5, rtol=1e-5)
  assert np.isnan(np.asarray(out[:, 30])).all()


def test_mask_definition_and_value_errors():
  # Border shift: query 0 of L=7, K=3 sees keys 0..2; query 6 sees 4..6.
  m = nb.neighborhood_mask_np((7,), 3)
  assert m[0].nonzero()[0].tolist() == [0, 1, 2]
  assert m[6].nonzero()[0].tolist() == [4, 5, 6]
  assert (m.sum(1) == 3).all()
  # Dilation groups: L=7, d=2: group 1 = {1, 3, 5}, K=3 -> all of them.
  m = nb.neighborhood_mask_np((7,), 3, dilation=2)
  assert m[3].nonzero()[0].tolist() == [1, 3, 5]
  x = jnp.zeros((1, 6, 2, 8))
  with pytest.raises(ValueError, match="kernel_size"):
    nb.neighborhood_attention(x, x, x, 4, dilation=2)
  with pytest.raises(ValueError, match="query"):
    nb.neighborhood_attention(x[0], x[0], x[0], 3)
  with pytest.raises(ValueError, match="key"):
    nb.neighborhood_attention(x, x[:, :5], x, 3)


def test_visited_fraction_hand_counts():
  # 1D, 512 tokens in 4 tiles of 128, kernel 3: each tile pairs with itself
  # and its neighbours (windows cross tile borders): 4 + 2*3 = 10 of 16.
  assert nb.visited_fraction((512,), 3, tile_size=128) == 10 / 16
  # Causal: only itself and the previous tile: 4 + 3 = 7 of 16.
  assert nb.visited_fraction((512,), 3, tile_size=128, is_causal=True) == 7 / 16
  # A kernel as large as the image: every pair of tiles.
  assert nb.visited_fraction((16, 16), 16, tile_size=(8, 8)) == 1.0
  # 2D, 32x32 in 4x4 tiles of 8x8, kernel 3: each tile pairs with its
  # 3x3 tile neighbourhood clipped at the border: (4+2*3)^2 = 100 of 256.
  assert nb.visited_fraction((32, 32), 3, tile_size=(8, 8)) == 100 / 256
  # Dilation 2 on 32: two groups of 16, tiles of 8 -> 2 tiles per group,
  # kernel 3 links both tiles of a group: 2 groups x 4 pairs of 4^2 = 16.
  assert nb.visited_fraction((32,), 3, dilation=2, tile_size=8) == 8 / 16
