"""Issue 15 (families side): silently-wrong arguments of the spatial family
and the family Pallas kernels are refused or honoured.

CSWin even LePE kernels, float tuples truncated, qk_scale=0.0 ignored,
resize_relative_position_bias on an even table, neighborhood_window_start
on invalid inputs, average_pool / CrossViTFusion arguments, NCHW / wrong
width into layers, the 1D tile_size=(1, tile) form of the Pallas
neighborhood kernel, np.int64 scalars, causal_linear_attention with eps=0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import spatial as sp
from pallas_kernels import linear_attention as pl_linear
from pallas_kernels import neighborhood as pl_na


def _qkv(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in ks)


# ------------------------------------------------------------------ CSWin

def test_cswin_even_lepe_kernel_refused():
  q, k, v = _qkv((1, 6, 6, 2, 4))
  lepe = jnp.ones((2, 2, 2, 4))
  with pytest.raises(ValueError, match="lepe_kernel"):
    sp.cross_shaped_window_attention(q, k, v, 2, lepe_kernel=lepe)
  with pytest.raises(ValueError, match="lepe_kernel"):
    sp.cross_shaped_window_attention_reference(q, k, v, 2, lepe_kernel=lepe)
  with pytest.raises(ValueError, match="lepe_kernel_size"):
    sp.CSWinAttention(8, 2, 2, lepe_kernel_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="lepe_kernel_size"):
    sp.CSWinAttention(8, 2, 2, lepe_kernel_size=0, rngs=nnx.Rngs(0))


def test_cswin_odd_lepe_still_matches_reference():
  q, k, v = _qkv((1, 6, 6, 2, 4), seed=1)
  lepe = jax.random.normal(jax.random.key(2), (3, 3, 2, 4))
  bias = jax.random.normal(jax.random.key(3), (2, 4))
  got = sp.cross_shaped_window_attention(q, k, v, 2, lepe_kernel=lepe,
                                         lepe_bias=bias)
  want = sp.cross_shaped_window_attention_reference(q, k, v, 2,
                                                    lepe_kernel=lepe,
                                                    lepe_bias=bias)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cswin_lepe_bias_and_empty_map_validated():
  q, k, v = _qkv((1, 6, 6, 2, 4))
  lepe = jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError, match="lepe_bias"):
    sp.cross_shaped_window_attention(q, k, v, 2, lepe_kernel=lepe,
                                     lepe_bias=jnp.ones((4, 2)))
  with pytest.raises(ValueError, match="lepe_bias"):
    sp.cross_shaped_window_attention(q, k, v, 2, lepe_bias=jnp.ones((2, 4)))
  e = jnp.zeros((1, 0, 6, 2, 4))
  with pytest.raises(ValueError, match="empty"):
    sp.cross_shaped_window_attention(e, e, e, 2)
  layer = sp.CSWinAttention(8, 2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="empty"):
    layer(jnp.zeros((1, 0, 4, 8)))


# ------------------------------------------------------- argument truncation

@pytest.mark.parametrize("bad", [(3.7, 3.7), (2.5, 2), 3.0, (True, 3)])
def test_float_tuples_refused_not_truncated(bad):
  q, k, v = _qkv((1, 8, 8, 2, 4))
  with pytest.raises(ValueError, match="kernel_size"):
    sp.neighborhood_attention(q, k, v, bad)
  with pytest.raises(ValueError, match="window_size"):
    sp.window_attention(q, k, v, bad)
  with pytest.raises(ValueError, match="kernel_size"):
    sp.neighborhood_mask((8, 8), bad)


def test_numpy_integer_scalars_accepted():
  q, k, v = _qkv((1, 8, 8, 2, 4))
  np.testing.assert_allclose(
      sp.neighborhood_attention(q, k, v, np.int64(3)),
      sp.neighborhood_attention(q, k, v, 3), rtol=0, atol=0)
  np.testing.assert_allclose(
      sp.window_attention(q, k, v, (np.int64(4), np.int32(4))),
      sp.window_attention(q, k, v, 4), rtol=0, atol=0)
  x1 = q[:, 0]
  np.testing.assert_allclose(
      pl_na.neighborhood_attention(x1, x1, x1, np.int64(3)),
      pl_na.neighborhood_attention(x1, x1, x1, 3), rtol=0, atol=0)


# ---------------------------------------------------------------- qk_scale

def _layers(**kw):
  r = lambda: nnx.Rngs(0)
  return {
      "WindowAttention": lambda: sp.WindowAttention(8, 2, 4, rngs=r(), **kw),
      "GridAttention": lambda: sp.GridAttention(8, 2, 2, rngs=r(), **kw),
      "NeighborhoodAttention": lambda: sp.NeighborhoodAttention(
          8, 2, 3, rngs=r(), **kw),
      "AxialAttention": lambda: sp.AxialAttention(8, 2, rngs=r(), **kw),
      "CSWinAttention": lambda: sp.CSWinAttention(8, 2, 2, rngs=r(), **kw),
      "GlobalSubsampledAttention": lambda: sp.GlobalSubsampledAttention(
          8, 2, 2, rngs=r(), **kw),
      "HiLoAttention": lambda: sp.HiLoAttention(8, 2, 2, rngs=r(), **kw),
      "BiLevelRoutingAttention": lambda: sp.BiLevelRoutingAttention(
          8, 2, 2, 2, rngs=r(), **kw),
      "ChannelAttention": lambda: sp.ChannelAttention(8, 2, rngs=r(), **kw),
      "GPSA": lambda: sp.GPSA(8, 4, rngs=r(), **kw),
  }


@pytest.mark.parametrize("name", sorted(_layers()))
def test_qk_scale_zero_is_honoured_and_nan_refused(name):
  layer = _layers(qk_scale=0.0)[name]()
  assert layer.scale == 0.0
  with pytest.raises(ValueError, match="qk_scale"):
    _layers(qk_scale=float("nan"))[name]()


def test_qk_scale_zero_gives_uniform_window_attention():
  # scale 0: every token of a window gets weight 1 / window_tokens.
  layer = sp.WindowAttention(8, 2, 4, qk_scale=0.0, use_rpb=False,
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (1, 4, 4, 8))
  v = layer.qkv(x).reshape(1, 4, 4, 3, 2, 4)[..., 2, :, :]
  mean_v = jnp.broadcast_to(v.mean(axis=(1, 2), keepdims=True), v.shape)
  want = layer.proj(mean_v.reshape(1, 4, 4, 8))
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------- layouts / widths / empty

@pytest.mark.parametrize("name", sorted(_layers()))
def test_layers_name_expected_layout(name):
  layer = _layers()[name]()
  nchw = jnp.zeros((1, 8, 6, 6))               # channels first
  with pytest.raises(ValueError, match="channels"):
    layer(nchw)
  with pytest.raises(ValueError, match="dim=8"):
    layer(jnp.zeros((1, 6, 6, 5)))             # wrong width


def test_crossvit_layers_validate():
  with pytest.raises(ValueError, match="dim_b"):
    sp.CrossViTFusion(8, 0, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_heads_b"):
    sp.CrossViTFusion(8, 8, -1, rngs=nnx.Rngs(0))
  fuse = sp.CrossViTFusion(8, 12, 2, rngs=nnx.Rngs(0))
  a = jnp.ones((2, 5, 8))
  b = jnp.ones((2, 7, 12))
  assert fuse(a, b).shape == a.shape
  with pytest.raises(ValueError, match="tokens_a"):
    fuse(jnp.ones((2, 5, 12)), b)
  with pytest.raises(ValueError, match="tokens_b"):
    fuse(a, jnp.ones((2, 7, 8)))
  with pytest.raises(ValueError, match="batch"):
    fuse(a, jnp.ones((3, 7, 12)))
  with pytest.raises(ValueError, match="dim=8"):
    sp.CrossViTAttention(8, 2, rngs=nnx.Rngs(0))(jnp.ones((2, 5, 6)))


@pytest.mark.parametrize("bad", [2, 0, (0, 2), (-1, 2), (2.0, 2)])
def test_average_pool_validates(bad):
  x = jnp.ones((1, 4, 4, 3))
  with pytest.raises(ValueError, match="pool_size"):
    sp.average_pool(x, bad)


def test_average_pool_value():
  x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(1, 2, 5, 3)
  got = np.asarray(sp.average_pool(x, (2, 2)))
  xn = np.asarray(x)
  want = np.stack([xn[0, :, 0:2].mean((0, 1)), xn[0, :, 2:4].mean((0, 1)),
                   xn[0, :, 4:5].mean((0, 1))])[None, None]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_resize_relative_position_bias_even_table_refused():
  with pytest.raises(ValueError, match="rpb"):
    sp.resize_relative_position_bias(jnp.ones((2, 4, 4)), (3, 3))
  rpb = jax.random.normal(jax.random.key(0), (2, 5, 5))
  assert sp.resize_relative_position_bias(rpb, (3, 3)) is rpb
  assert sp.resize_relative_position_bias(rpb, (5, 5)).shape == (2, 9, 9)


@pytest.mark.parametrize("args", [(5, 7), (5, 3, 2), (0, 1), (5, 0),
                                  (5, 3, 0), (5, -3), (5.5, 3)])
def test_neighborhood_window_start_invalid(args):
  with pytest.raises(ValueError):
    sp.neighborhood_window_start(*args)


def test_neighborhood_window_start_valid_matches_mask():
  for length, k, d, causal in [(9, 3, 1, False), (10, 3, 3, False),
                               (7, 4, 1, True)]:
    st = sp.neighborhood_window_start(length, k, d, causal)
    assert st.min() >= 0 and st.max() < length
    m = np.asarray(sp.neighborhood_mask((length,), k, d, causal))
    np.testing.assert_array_equal(st, m.argmax(-1))


# -------------------------------------------------------- Pallas kernels

def test_pallas_neighborhood_accepts_documented_1d_tile_size():
  q, k, v = _qkv((1, 16, 2, 8))
  want = pl_na.neighborhood_attention_reference(q, k, v, 3)
  for tile in ((1, 8), (8,), 8):
    got = pl_na.neighborhood_attention(q, k, v, 3, tile_size=tile)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="tile_size"):
    pl_na.neighborhood_attention(q, k, v, 3, tile_size=(2, 8))


def test_pallas_causal_linear_identity_eps0_zero_query_row():
  q, k, v = _qkv((1, 8, 2, 4), seed=4)
  q = q.at[0, 3].set(0.0)
  k = jnp.abs(k)
  got = pl_linear.causal_linear_attention(q, k, v, feature_map="identity",
                                          eps=0.0, chunk_size=8)
  want = attnjax.linear_attention(q, k, v, feature_map="identity",
                                  is_causal=True)
  assert np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got[0, 3]), 0.0)
  ref = pl_linear.causal_linear_attention_reference(
      q, k, v, feature_map="identity", eps=0.0)
  np.testing.assert_allclose(ref, want, rtol=1e-4, atol=1e-5)
  g = jax.grad(lambda q: jnp.sum(pl_linear.causal_linear_attention(
      q, k, v, feature_map="identity", eps=0.0, chunk_size=8)))(q)
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match="eps"):
    pl_linear.causal_linear_attention(q, k, v, eps=-1.0)
