"""3D (Video Swin) shifted window attention: the mask against Video Swin's
compute_mask construction, values/grads vs the dense reference, masks,
bf16, errors, layer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal)

SHAPE = (2, 3, 5, 6, 4, 3)        # B, D, H, W, N, Hd
WIN, SHIFT = (2, 3, 4), (1, 1, 2)


def _video_swin_allowed(spatial, win, shift):
  """Video Swin's construction: pad, label the rolled frame with the 27
  slice regions (compute_mask), same window & same label may attend; mapped
  back to original positions and cropped to the real tokens."""
  padded = [-(-l // w) * w for l, w in zip(spatial, win)]
  img = np.zeros(padded, int)
  cnt = 0
  sl = lambda w, s: (slice(None, -w), slice(-w, -s), slice(-s, None)) if s else (
      slice(None),)
  for d, h, w in itertools.product(*[sl(w, s) for w, s in zip(win, shift)]):
    img[d, h, w] = cnt
    cnt += 1
  allowed = np.zeros((int(np.prod(padded)),) * 2, bool)
  coords = list(itertools.product(*[range(p) for p in padded]))
  flat = lambda c: np.ravel_multi_index(c, padded)
  for r in coords:                 # r: rolled-frame position of the query
    for r2 in coords:
      if all(a // w == b // w for a, b, w in zip(r, r2, win)) and img[r] == img[r2]:
        p1 = tuple((a + s) % p for a, s, p in zip(r, shift, padded))
        p2 = tuple((a + s) % p for a, s, p in zip(r2, shift, padded))
        allowed[flat(p1), flat(p2)] = True
  real = np.array([flat(c) for c in itertools.product(*[range(l) for l in spatial])])
  return allowed[np.ix_(real, real)]


@pytest.mark.parametrize("spatial,win,shift", [((3, 5, 6), WIN, SHIFT),
                                               ((4, 4, 4), (2, 2, 4), (1, 1, 0))])
def test_mask_matches_video_swin_compute_mask(spatial, win, shift):
  np.testing.assert_array_equal(sp.window_3d_mask(spatial, win, shift),
                                _video_swin_allowed(spatial, win, shift))


def test_values_grads_jit_vmap_with_rpb_and_key_mask():
  b, d, h, w, n, hd = SHAPE
  q = normal(0, SHAPE)
  k, v = normal(1, (b, d, h, w, 2, hd)), normal(2, (b, d, h, w, 2, hd))
  rpb = normal(3, (n, 3, 5, 7))
  km = jax.random.bernoulli(jax.random.key(4), 0.8, (b, d, h, w))
  fn = lambda q, k, v, r: sp.window_attention_3d(q, k, v, WIN, shift_size=SHIFT,
                                                 rpb=r, key_mask=km)
  ref = lambda q, k, v, r: sp.window_attention_3d_reference(
      q, k, v, WIN, shift_size=SHIFT, rpb=r, key_mask=km)
  check_values_grads_jit_vmap(fn, ref, (q, k, v, rpb), batched=(0, 1, 2, 3))
  # Same as the generic nD window_attention when nothing extra is masked.
  np.testing.assert_allclose(
      sp.window_attention_3d(q, k, v, WIN, shift_size=SHIFT, rpb=rpb),
      sp.window_attention(q, k, v, WIN, shift_size=SHIFT, rpb=rpb), atol=1e-5)


def test_bfloat16():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  check_bf16(lambda q, k, v: sp.window_attention_3d(q, k, v, WIN, shift_size=SHIFT),
             lambda q, k, v: sp.window_attention_3d_reference(
                 q, k, v, WIN, shift_size=SHIFT), (q, k, v))


def test_masked_slots_and_empty_rows():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  km = np.ones(SHAPE[:4], bool)
  km[0, 1, 2, 3] = False
  km[1] = False
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2, 3].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2, 3].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda k, v: sp.window_attention_3d(q, k, v, WIN, shift_size=SHIFT,
                                          key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_errors():
  q, k, v = (normal(i, SHAPE) for i in range(3))
  with pytest.raises(ValueError, match="shift_size"):
    sp.window_attention_3d(q, k, v, 2, shift_size=2)
  with pytest.raises(ValueError, match="rpb.*\\(4, 3, 3, 3\\)"):
    sp.window_attention_3d(q, k, v, 2, rpb=jnp.zeros((4, 3, 3)))
  with pytest.raises(ValueError, match="key_mask"):
    sp.window_attention_3d(q, k, v, 2, key_mask=jnp.ones((2, 3, 5), bool))
  with pytest.raises(ValueError, match="query"):
    sp.window_attention_3d(q[:, 0], k[:, 0], v[:, 0], 2)


def test_video_window_size_and_layer():
  assert sp.video_window_size((4, 14, 14), (8, 7, 7), (4, 3, 3)) == (
      (4, 7, 7), (0, 3, 3))
  layer = sp.WindowAttention3D(16, 4, (2, 3, 3), shift_size=(1, 1, 1),
                               rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n == 16 * 48 + 48 + 16 * 16 + 16 + 3 * 5 * 5 * 4
  # layer and reference each compiled as one program (eager, each op was
  # compiled on its own)
  @nnx.jit
  def got_want(layer, x):
    qkv = layer.qkv(x).reshape(1, 2, 4, 5, 3, 4, 4)
    want = sp.window_attention_3d_reference(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (2, 3, 3),
        shift_size=(0, 1, 1), rpb=layer.relative_position_bias(), scale=0.5)
    return layer(x), layer.proj(want.reshape(x.shape))

  x = normal(5, (1, 2, 4, 5, 16))       # depth 2 <= window 2: no depth shift
  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)

  # A map smaller than the window: the central part of the table.
  @nnx.jit
  def got_want_small(layer, x):
    qkv = layer.qkv(x).reshape(1, 1, 2, 5, 3, 4, 4)
    rpb = layer.relative_position_bias()[:, 1:2, 1:4, :]
    want = sp.window_attention_3d_reference(
        qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :], (1, 2, 3),
        shift_size=(0, 0, 1), rpb=rpb, scale=0.5)
    return layer(x), layer.proj(want.reshape(x.shape))

  x = normal(6, (1, 1, 2, 5, 16))
  np.testing.assert_allclose(*got_want_small(layer, x), atol=1e-5)
