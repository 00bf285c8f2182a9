"""Window / shifted-window (Swin) and block / grid (MaxViT) attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.spatial import (GridAttention, WindowAttention, grid_attention,
                             grid_attention_reference,
                             relative_position_index,
                             resize_relative_position_bias, window_attention,
                             window_attention_reference)
from tests.spatial.zoo_checks import value_and_grad0


def _inputs(spatial, heads=2, kv_heads=None, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(0), 3)
  kv_heads = kv_heads or heads
  return (jax.random.normal(ks[0], (2, *spatial, heads, 4), dtype),
          jax.random.normal(ks[1], (2, *spatial, kv_heads, 4), dtype),
          jax.random.normal(ks[2], (2, *spatial, kv_heads, 3), dtype))


def _rpb(heads, win):
  return jax.random.normal(jax.random.key(7),
                           (heads,) + tuple(2 * w - 1 for w in win))


def _swin_original(q, k, v, ws, shift, table):
  """Swin's algorithm for divisible 2D maps (roll, img_mask, -100 mask),
  written from the paper's reference procedure with NumPy."""
  q, k, v, table = (np.asarray(x, np.float64) for x in (q, k, v, table))
  b, h, w, n, d = q.shape
  if shift:
    q, k, v = (np.roll(x, (-shift, -shift), axis=(1, 2)) for x in (q, k, v))
  img = np.zeros((h, w))
  cnt = 0
  sl = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)) if shift else (
      slice(None),)
  for hs in sl:
    for wsl in sl:
      img[hs, wsl] = cnt
      cnt += 1
  out = np.zeros(v.shape)
  idx = relative_position_index((ws, ws))
  bias = table[idx.reshape(-1)].reshape(ws * ws, ws * ws, n).transpose(2, 0, 1)
  for i in range(0, h, ws):
    for j in range(0, w, ws):
      r = img[i:i + ws, j:j + ws].reshape(-1)
      m = np.where(r[:, None] == r[None], 0.0, -100.0)
      qq, kk, vv = (x[:, i:i + ws, j:j + ws].reshape(b, -1, n, x.shape[-1])
                    for x in (q, k, v))
      lg = np.einsum("bqnh,bknh->bnqk", qq, kk) / np.sqrt(d) + bias + m
      p = np.exp(lg - lg.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, i:i + ws, j:j + ws] = np.einsum("bnqk,bknh->bqnh", p, vv).reshape(
          b, ws, ws, n, -1)
  if shift:
    out = np.roll(out, (shift, shift), axis=(1, 2))
  return out


@pytest.mark.parametrize("shift", [0, 2])
def test_matches_swin_algorithm(shift):
  q, k, v = _inputs((8, 12))
  table = jax.random.normal(jax.random.key(3), ((2 * 4 - 1) ** 2, 2))
  rpb = jnp.moveaxis(table.reshape(7, 7, 2), -1, 0)
  out = window_attention(q, k, v, 4, shift_size=shift, rpb=rpb)
  want = _swin_original(q, k, v, 4, shift, table)
  np.testing.assert_allclose(out, want, atol=1e-5)


WINDOW_CASES = [
    ((9, 7), (4, 4), (2, 1)),      # padding + shift
    ((5, 6), (3, 4), (0, 0)),      # padding, no shift
    ((10,), (4,), (3,)),           # 1D
    ((4, 5, 6), (2, 3, 4), (1, 1, 2)),  # 3D
    ((3, 3), (7, 7), (0, 0)),      # window larger than the map
]


@pytest.mark.parametrize("spatial,win,shift", WINDOW_CASES)
def test_window_values_and_grads(spatial, win, shift):
  q, k, v = _inputs(spatial)
  rpb = _rpb(2, win)
  f = lambda q, k, v, rpb: window_attention(q, k, v, win, shift_size=shift,
                                            rpb=rpb)
  r = lambda q, k, v, rpb: window_attention_reference(q, k, v, win,
                                                      shift_size=shift, rpb=rpb)
  np.testing.assert_allclose(jax.jit(f)(q, k, v, rpb), r(q, k, v, rpb),
                             atol=2e-6)
  ct = jax.random.normal(jax.random.key(1), q.shape[:-1] + (3,))
  grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct),
                                     argnums=(0, 1, 2, 3)))(q, k, v, rpb)
  for a, b in zip(grad(f), grad(r)):
    np.testing.assert_allclose(a, b, atol=1e-5)


GRID_CASES = [((8, 8), (4, 4)), ((9, 7), (3, 4)), ((10,), (3,)),
              ((4, 6, 5), (2, 3, 2))]


@pytest.mark.parametrize("spatial,grid", GRID_CASES)
def test_grid_values_and_grads(spatial, grid):
  q, k, v = _inputs(spatial)
  rpb = _rpb(2, grid)
  f = lambda q, k, v, rpb: grid_attention(q, k, v, grid, rpb=rpb)
  r = lambda q, k, v, rpb: grid_attention_reference(q, k, v, grid, rpb=rpb)
  np.testing.assert_allclose(jax.jit(f)(q, k, v, rpb), r(q, k, v, rpb),
                             atol=2e-6)
  ct = jax.random.normal(jax.random.key(1), q.shape[:-1] + (3,))
  grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * ct),
                                     argnums=(0, 1, 2, 3)))(q, k, v, rpb)
  for a, b in zip(grad(f), grad(r)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_grid_groups_are_strided():
  # 8x8 map, grid 4: tokens (i, j) and (i + 2, j + 4) share a grid window.
  q, k, v = _inputs((8, 8), heads=1)
  v = jnp.zeros_like(v).at[:, 2, 4].set(1.0)
  out = grid_attention(q, k, v, 4)
  nz = np.argwhere(np.abs(np.asarray(out[0, ..., 0, 0])) > 0)
  assert {tuple(x) for x in nz} == {(i, j) for i in (0, 2, 4, 6)
                                    for j in (0, 2, 4, 6)}


def test_bfloat16_gqa_vmap():
  q, k, v = _inputs((9, 7), heads=4, kv_heads=2, dtype=jnp.bfloat16)
  rpb = _rpb(4, (4, 4))
  # Everything compiled (was eager: every op compiled on its own).
  out = jax.jit(lambda q, k, v, rpb: window_attention(
      q, k, v, 4, shift_size=2, rpb=rpb))(q, k, v, rpb)
  assert out.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(lambda q, k, v, rpb: window_attention_reference(
      q, k, v, 4, shift_size=2, rpb=rpb))(f32(q), f32(k), f32(v), rpb)
  np.testing.assert_allclose(f32(out), ref, atol=3e-2, rtol=3e-2)
  # grid attention: values and d sum / dq, each side one jit(vjp)
  gout, g = value_and_grad0(lambda q, k, v: grid_attention(q, k, v, 3),
                            (q, k, v))
  gref, gr = value_and_grad0(
      lambda q, k, v: grid_attention_reference(q, k, v, 3),
      (f32(q), f32(k), f32(v)))
  np.testing.assert_allclose(f32(gout), gref, atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(f32(g), gr, atol=5e-2, rtol=5e-2)
  vm = jax.jit(jax.vmap(lambda q, k, v: window_attention(q, k, v, 4,
                                                         shift_size=2)))
  q, k, v = (f32(x) for x in (q, k, v))
  np.testing.assert_allclose(
      vm(q[:, None], k[:, None], v[:, None])[:, 0],
      jax.jit(lambda q, k, v: window_attention_reference(
          q, k, v, 4, shift_size=2))(q, k, v), atol=2e-6)


def test_resize_relative_position_bias():
  rpb = _rpb(2, (4, 4))
  assert resize_relative_position_bias(rpb, 4) is rpb
  big = resize_relative_position_bias(rpb, (6, 5))
  assert big.shape == (2, 11, 9)
  # A constant table stays constant; a linear ramp stays (close to) linear.
  const = resize_relative_position_bias(jnp.full((1, 7, 7), 2.5), 8)
  np.testing.assert_allclose(const, 2.5, atol=1e-5)
  ramp = jnp.broadcast_to(jnp.arange(7.0)[:, None], (1, 7, 7))
  out = resize_relative_position_bias(ramp, 10)[0, :, 0]
  assert np.all(np.diff(np.asarray(out)) > 0)


def test_errors():
  q, k, v = _inputs((6, 6))
  with pytest.raises(ValueError, match="shift_size.*window_size"):
    window_attention(q, k, v, 4, shift_size=4)
  with pytest.raises(ValueError, match="rpb.*\\(2, 7, 7\\)"):
    window_attention(q, k, v, 4, rpb=jnp.zeros((2, 5, 5)))
  with pytest.raises(ValueError, match="grid_size"):
    grid_attention(q, k, v, (2, 2, 2))
  with pytest.raises(ValueError, match="window_size"):
    window_attention(q, k, v, 0)
  with pytest.raises(ValueError, match="head_dim"):
    window_attention(q, k[..., :3], v, 4)


def test_layers():
  dim, heads = 12, 3
  layer = WindowAttention(dim, heads, 4, shift_size=2, rngs=nnx.Rngs(0))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n_params == dim * 3 * dim + 3 * dim + 49 * heads + dim * dim + dim
  x = jax.random.normal(jax.random.key(2), (2, 9, 6, dim))
  y = layer(x)
  qkv = layer.qkv(x).reshape(2, 9, 6, 3, heads, 4)
  o = window_attention_reference(qkv[..., 0, :, :], qkv[..., 1, :, :],
                                 qkv[..., 2, :, :], 4, shift_size=2,
                                 rpb=layer.relative_position_bias())
  np.testing.assert_allclose(y, layer.proj(o.reshape(x.shape)), atol=1e-5)
  layer.resize_window(6)
  assert layer.relative_position_bias_table.shape == (121, heads)
  assert layer(x).shape == x.shape
  grid = GridAttention(dim, heads, 3, rngs=nnx.Rngs(0))
  y = grid(x)
  qkv = grid.qkv(x).reshape(2, 9, 6, 3, heads, 4)
  o = grid_attention_reference(qkv[..., 0, :, :], qkv[..., 1, :, :],
                               qkv[..., 2, :, :], 3,
                               rpb=grid.relative_position_bias())
  np.testing.assert_allclose(y, grid.proj(o.reshape(x.shape)), atol=1e-5)
