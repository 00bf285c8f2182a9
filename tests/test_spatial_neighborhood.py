"""Neighborhood attention vs the dense-mask definition (NATTEN semantics)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.spatial import (NeighborhoodAttention, neighborhood_attention,
                             neighborhood_attention_reference,
                             neighborhood_mask, neighborhood_window_start)
from attnjax.spatial.neighborhood import NeighborhoodXLA
from tests.spatial.zoo_checks import jit_vjp


def _natten_window_start(index, length, kernel, dilation):
  """NATTEN's CPU-kernel formula for odd kernels (transcribed independently)."""
  ns = kernel // 2
  if dilation <= 1:
    return max(index - ns, 0) + (index + ns >= length) * (length - index - ns - 1)
  ni = index - ns * dilation
  if ni < 0:
    return index % dilation
  if index + ns * dilation >= length:
    imodd = index % dilation
    a = (length // dilation) * dilation
    b = length - a
    if imodd < b:
      return length - b + imodd - 2 * ns * dilation
    return a + imodd - kernel * dilation
  return ni


@pytest.mark.parametrize("length,kernel,dilation", [
    (7, 3, 1), (9, 5, 1), (10, 3, 2), (11, 3, 3), (13, 5, 2), (16, 7, 2),
    (17, 3, 5), (12, 3, 4)])
def test_window_start_matches_natten_formula(length, kernel, dilation):
  ours = neighborhood_window_start(length, kernel, dilation)
  ref = [_natten_window_start(i, length, kernel, dilation) for i in range(length)]
  np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("length,kernel,dilation", [
    (9, 3, 1), (10, 4, 1), (13, 3, 2), (14, 4, 3), (8, 8, 1)])
def test_mask_definition_brute_force(length, kernel, dilation):
  m = neighborhood_mask((length,), kernel, dilation)
  for i in range(length):
    cand = [j for j in range(length) if j % dilation == i % dilation]
    pos = cand.index(i)
    # The K consecutive group members whose offset from i is closest to the
    # centred window, shifted inward at the borders.
    lo = min(max(pos - kernel // 2, 0), len(cand) - kernel)
    want = set(cand[lo:lo + kernel])
    assert set(np.nonzero(m[i])[0]) == want, i
    assert m[i].sum() == kernel
  mc = neighborhood_mask((length,), kernel, dilation, is_causal=True)
  for i in range(length):
    cand = [j for j in range(i + 1) if j % dilation == i % dilation]
    assert set(np.nonzero(mc[i])[0]) == set(cand[-kernel:]), i


def test_mask_is_cartesian_product():
  m = neighborhood_mask((5, 6), (3, 5), (1, 1))
  m1 = neighborhood_mask((5,), 3)
  m2 = neighborhood_mask((6,), 5)
  np.testing.assert_array_equal(m, np.kron(m1, m2).astype(bool))
  assert (m.sum(-1) == 15).all()


def _inputs(spatial, heads=2, kv_heads=None, hd=4, hv=3, dtype=jnp.float32,
            seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  kv_heads = kv_heads or heads
  q = jax.random.normal(ks[0], (2, *spatial, heads, hd), dtype)
  k = jax.random.normal(ks[1], (2, *spatial, kv_heads, hd), dtype)
  v = jax.random.normal(ks[2], (2, *spatial, kv_heads, hv), dtype)
  return q, k, v


def _rpb(heads, kernel, seed=3):
  return jax.random.normal(jax.random.key(seed),
                           (heads,) + tuple(2 * k - 1 for k in kernel))


CASES = [
    # spatial, kernel, dilation, causal, rpb, tile
    ((11,), (3,), (1,), False, True, None),
    ((12,), (4,), (2,), False, False, 3),
    ((13,), (5,), (2,), True, False, 2),
    ((7, 9), (3, 5), (2, 1), False, True, 2),
    ((8, 8), (3, 3), (1, 1), (True, False), False, None),
    ((9, 10), (4, 3), (2, 3), False, True, 4),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), False, True, (2, 3, 1)),
    ((5, 4, 6), (3, 2, 3), (1, 2, 1), (False, True, True), False, None),
]


@pytest.mark.parametrize("spatial,kernel,dilation,causal,use_rpb,tile", CASES)
def test_values_and_grads_float32(spatial, kernel, dilation, causal, use_rpb,
                                  tile):
  q, k, v = _inputs(spatial)
  rpb = _rpb(2, kernel) if use_rpb else None
  kw = dict(dilation=dilation, is_causal=causal)
  # Values and the gradients of sum(out * ct): each side one jit(vjp) (the
  # eager version compiled every op of both, per case).
  ct = jax.random.normal(jax.random.key(9), q.shape[:-1] + v.shape[-1:])
  argnums = (0, 1, 2, 3) if use_rpb else (0, 1, 2)
  out, g = jit_vjp(lambda q, k, v, rpb: neighborhood_attention(
      q, k, v, kernel, rpb=rpb, implementation=NeighborhoodXLA(tile), **kw),
                   (q, k, v, rpb), ct, argnums)
  ref, gr = jit_vjp(lambda q, k, v, rpb: neighborhood_attention_reference(
      q, k, v, kernel, rpb=rpb, **kw), (q, k, v, rpb), ct, argnums)
  np.testing.assert_allclose(out, ref, atol=2e-6, rtol=2e-6)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_matches_plain_full_attention_when_kernel_covers_input():
  q, k, v = _inputs((5, 6))
  out = neighborhood_attention(q, k, v, (5, 6))
  s = 30
  f = lambda x: x.reshape(2, s, *x.shape[-2:])
  logits = jnp.einsum("bqnh,bknh->bnqk", f(q), f(k)) / 2.0
  ref = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(logits, -1), f(v))
  np.testing.assert_allclose(out, ref.reshape(out.shape), atol=2e-6)


def test_gqa_and_scale():
  q, k, v = _inputs((9, 7), heads=4, kv_heads=2)
  out = neighborhood_attention(q, k, v, 3, dilation=(2, 1), scale=0.3)
  ref = neighborhood_attention_reference(q, k, v, 3, dilation=(2, 1), scale=0.3)
  np.testing.assert_allclose(out, ref, atol=2e-6)
  # GQA equals explicit head repetition.
  rep = lambda x: jnp.repeat(x, 2, axis=-2)
  out2 = neighborhood_attention(q, rep(k), rep(v), 3, dilation=(2, 1), scale=0.3)
  np.testing.assert_allclose(out, out2, atol=1e-6)


def test_bfloat16():
  q, k, v = _inputs((9, 10), dtype=jnp.bfloat16)
  rpb = _rpb(2, (3, 5))
  out = neighborhood_attention(q, k, v, (3, 5), dilation=(2, 1), rpb=rpb)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  ref = neighborhood_attention_reference(f32(q), f32(k), f32(v), (3, 5),
                                         dilation=(2, 1), rpb=rpb)
  np.testing.assert_allclose(f32(out), ref, atol=3e-2, rtol=3e-2)
  g = jax.grad(lambda q: neighborhood_attention(
      q, k, v, (3, 5), dilation=(2, 1), rpb=rpb).astype(jnp.float32).sum())(q)
  gr = jax.grad(lambda q: neighborhood_attention_reference(
      q, f32(k), f32(v), (3, 5), dilation=(2, 1), rpb=rpb).sum())(f32(q))
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(g), gr, atol=6e-2, rtol=6e-2)


def test_jit_and_vmap():
  q, k, v = _inputs((6, 7))
  fn = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, 3, dilation=2))
  ref = neighborhood_attention_reference(q, k, v, 3, dilation=2)
  np.testing.assert_allclose(fn(q, k, v), ref, atol=2e-6)
  vm = jax.vmap(lambda q, k, v: neighborhood_attention(q, k, v, 3, dilation=2))
  out = vm(q[:, None], k[:, None], v[:, None])[:, 0]
  np.testing.assert_allclose(out, ref, atol=2e-6)


def test_does_not_materialize_dense_scores():
  # 48x48 tokens: a dense [S, S] float32 score matrix alone is 21 MB per head.
  q, k, v = _inputs((48, 48), heads=1, hd=4, hv=4)
  fn = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, 5))
  mem = fn.lower(q, k, v).compile().memory_analysis()
  s = 48 * 48
  assert mem.temp_size_in_bytes < s * s * 4 / 4


def test_errors():
  q, k, v = _inputs((6, 7))
  with pytest.raises(ValueError, match="kernel_size.*dilation.*axis 1"):
    neighborhood_attention(q, k, v, (3, 4), dilation=(1, 2))
  with pytest.raises(ValueError, match="kernel_size"):
    neighborhood_attention(q, k, v, (3, 3, 3))
  with pytest.raises(ValueError, match="dilation"):
    neighborhood_attention(q, k, v, 3, dilation=0)
  with pytest.raises(ValueError, match="rpb.*\\(2, 5, 5\\)"):
    neighborhood_attention(q, k, v, 3, rpb=jnp.zeros((2, 3, 3)))
  with pytest.raises(ValueError, match="query.*spatial"):
    neighborhood_attention(q[:, 0, 0], k[:, 0, 0], v[:, 0, 0], 3)
  with pytest.raises(ValueError, match="same spatial shape"):
    neighborhood_attention(q, k[:, :5], v[:, :5], 3)
  with pytest.raises(ValueError, match="is_causal"):
    neighborhood_attention(q, k, v, 3, is_causal=(True,))


def test_layer_matches_functional_and_counts_params():
  dim, heads = 16, 4
  layer = NeighborhoodAttention(dim, heads, 3, dilation=2, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  # NAT: qkv (dim*3dim + 3dim) + rpb heads*(2K-1)^2 + proj (dim*dim + dim).
  assert n_params == dim * 3 * dim + 3 * dim + heads * 25 + dim * dim + dim
  layer.rpb[...] = jax.random.normal(jax.random.key(1), layer.rpb.shape)
  x = jax.random.normal(jax.random.key(2), (2, 7, 8, dim))
  y = layer(x)
  qkv = layer.qkv(x).reshape(2, 7, 8, 3, heads, 4)
  o = neighborhood_attention_reference(
      qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], 3, dilation=2,
      rpb=layer.rpb[...])
  np.testing.assert_allclose(y, layer.proj(o.reshape(2, 7, 8, dim)), atol=1e-5)
  # Input smaller than kernel * dilation: falls back to a fitting kernel.
  y_small = layer(x[:, :4, :2])
  assert y_small.shape == (2, 4, 2, dim)
  assert np.isfinite(np.asarray(y_small)).all()
  layer1d = NeighborhoodAttention(dim, heads, (5,), rngs=nnx.Rngs(0))
  assert layer1d(jnp.ones((1, 9, dim))).shape == (1, 9, dim)
  with pytest.raises(ValueError, match="x"):
    layer1d(x)
