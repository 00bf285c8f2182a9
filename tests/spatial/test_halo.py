"""HaloNet blocked local attention: float64 per-pixel definition, reference,
jit/vmap/grad, bf16, masks, memory linear in pixels, errors, layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)


def _inputs(shape=(2, 7, 9, 4, 3), kvh=2, block=(3, 4), halo=(1, 2)):
  b, h, w, n, d = shape
  q = normal(0, shape)
  k = normal(1, (b, h, w, kvh, d))
  v = normal(2, (b, h, w, kvh, d))
  win = [bb + 2 * hh for bb, hh in zip(block, halo)]
  rh = normal(3, (2 * win[0] - 1, d))
  rw = normal(4, (n, 2 * win[1] - 1, d))
  return q, k, v, rh, rw


def _halo64(q, k, v, block, halo, rh, rw, key_mask, scale):
  """HaloNet by its definition, one query at a time, float64."""
  q, k, v, rh, rw = (np.asarray(x, np.float64) for x in (q, k, v, rh, rw))
  b_, hgt, wid, n, d = q.shape
  rep = n // k.shape[-2]
  rh = np.broadcast_to(rh, (n,) + rh.shape[-2:])
  rw = np.broadcast_to(rw, (n,) + rw.shape[-2:])
  out = np.zeros(q.shape[:-1] + (v.shape[-1],))
  (bh, bw), (hh, hw) = block, halo
  wh, ww = bh + 2 * hh, bw + 2 * hw
  for bi in range(b_):
    for y in range(hgt):
      for x in range(wid):
        y0, x0 = (y // bh) * bh - hh, (x // bw) * bw - hw
        keys = [(ky, kx) for ky in range(y0, y0 + wh) for kx in range(x0, x0 + ww)
                if 0 <= ky < hgt and 0 <= kx < wid]
        for hd in range(n):
          qq = q[bi, y, x, hd]
          lg, ok, vals = [], [], []
          for ky, kx in keys:
            iy = (ky - y0) - (y - (y // bh) * bh) + wh - 1
            ix = (kx - x0) - (x - (x // bw) * bw) + ww - 1
            lg.append(scale * qq @ k[bi, ky, kx, hd // rep]
                      + qq @ (rh[hd, iy] + rw[hd, ix]))
            ok.append(True if key_mask is None else bool(key_mask[bi, ky, kx]))
            vals.append(v[bi, ky, kx, hd // rep])
          p = softmax64(np.array(lg), np.array(ok))
          out[bi, y, x, hd] = p @ np.array(vals)
  return out


def test_matches_float64_definition_and_reference():
  q, k, v, rh, rw = _inputs()
  km = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 7, 9))
  km = km.at[0, :3, :].set(False)      # a whole block row of keys masked
  args = dict(rel_h=rh, rel_w=rw, key_mask=km)
  out = sp.halo_attention(q, k, v, (3, 4), (1, 2), **args)
  want = _halo64(q, k, v, (3, 4), (1, 2), rh, rw, np.asarray(km), 3 ** -0.5)
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(
      sp.halo_attention_reference(q, k, v, (3, 4), (1, 2), **args), want,
      atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block,halo", [((3, 4), (1, 2)), (4, 3)])
def test_values_grads_jit_vmap(block, halo):
  q, k, v, _, _ = _inputs(block=block if isinstance(block, tuple) else (block,) * 2,
                          halo=halo if isinstance(halo, tuple) else (halo,) * 2)
  bt = block if isinstance(block, tuple) else (block,) * 2
  ht = halo if isinstance(halo, tuple) else (halo,) * 2
  rh = normal(3, (2 * (bt[0] + 2 * ht[0]) - 1, 3))
  rw = normal(4, (2 * (bt[1] + 2 * ht[1]) - 1, 3))
  fn = lambda q, k, v, rh, rw: sp.halo_attention(q, k, v, block, halo,
                                                 rel_h=rh, rel_w=rw)
  ref = lambda q, k, v, rh, rw: sp.halo_attention_reference(
      q, k, v, block, halo, rel_h=rh, rel_w=rw)
  check_values_grads_jit_vmap(fn, ref, (q, k, v, rh, rw),
                              batched=(0, 1, 2, 3, 4))


def test_bfloat16():
  q, k, v, rh, rw = _inputs()
  fn = lambda q, k, v: sp.halo_attention(q, k, v, (3, 4), (1, 2),
                                         rel_h=rh.astype(q.dtype),
                                         rel_w=rw.astype(q.dtype))
  ref = lambda q, k, v: sp.halo_attention_reference(q, k, v, (3, 4), (1, 2),
                                                    rel_h=rh, rel_w=rw)
  check_bf16(fn, ref, (q, k, v), atol=1e-1)


def test_masked_keys_never_reach_output_and_empty_rows_are_zero():
  q, k, v, rh, rw = _inputs(kvh=4)
  km = np.ones((2, 7, 9), bool)
  km[:, 2, 5] = False
  km[1] = False                                    # batch 1: nothing valid
  km = jnp.asarray(km)
  kn = k.at[:, 2, 5].set(jnp.nan).at[1].set(jnp.nan)
  vn = v.at[:, 2, 5].set(jnp.nan).at[1].set(jnp.inf)
  f = lambda k, v: sp.halo_attention(q, k, v, 3, 1, key_mask=km)
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(k, v), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  gk, gv = jax.grad(lambda k, v: f(k, v).sum(), argnums=(0, 1))(kn, vn)
  assert np.isfinite(np.asarray(gk)).all() and np.isfinite(np.asarray(gv)).all()
  np.testing.assert_array_equal(gv[1], 0.0)


def test_halo_zero_is_block_attention():
  q, k, v, _, _ = _inputs((1, 6, 8, 2, 3), kvh=2)
  np.testing.assert_allclose(sp.halo_attention(q, k, v, (3, 4), 0),
                             sp.window_attention(q, k, v, (3, 4)), atol=1e-5)


def test_memory_linear_in_pixels():
  def temp(size):
    x = jax.ShapeDtypeStruct((1, size, size, 2, 8), jnp.float32)
    c = jax.jit(lambda q, k, v: sp.halo_attention(q, k, v, 8, 2)).lower(
        x, x, x).compile()
    return c.memory_analysis().temp_size_in_bytes
  small, big = temp(32), temp(64)
  assert big < 5 * small          # 4x pixels; dense [S, S] would be 16x


def test_errors():
  q, k, v, rh, _ = _inputs()
  with pytest.raises(ValueError, match="rel_h.*\\(7, 3\\).*\\(9, 3\\)"):
    sp.halo_attention(q, k, v, 2, 1, rel_h=rh)
  with pytest.raises(ValueError, match="key_mask.*\\(2, 7, 9\\)"):
    sp.halo_attention(q, k, v, 3, 1, key_mask=jnp.ones((2, 7), bool))
  with pytest.raises(ValueError, match="halo_size"):
    sp.halo_attention(q, k, v, 3, -1)
  with pytest.raises(ValueError, match="block_size"):
    sp.halo_attention(q, k, v, 0, 1)
  with pytest.raises(ValueError, match="query"):
    sp.halo_attention(q[:, 0], k[:, 0], v[:, 0], 3, 1)
  with pytest.raises(ValueError, match="implementation"):
    sp.halo_attention(q, k, v, 3, 1, implementation="nope")


def test_layer_matches_primitive_and_param_count():
  layer = sp.HaloAttention(16, 4, block_size=4, halo_size=1, rngs=nnx.Rngs(0))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n == 16 * 16 + 16 * 32 + 2 * (2 * 6 - 1) * 4
  x = normal(7, (2, 5, 7, 16))
  # layer and reference in one compiled program (eager, each op was compiled
  # on its own)
  @nnx.jit
  def got_want(layer, x):
    q = layer.q(x).reshape(2, 5, 7, 4, 4)
    kv = layer.kv(x).reshape(2, 5, 7, 2, 4, 4)
    want = sp.halo_attention_reference(q, kv[..., 0, :, :], kv[..., 1, :, :],
                                       4, 1, rel_h=layer.rel_h[...],
                                       rel_w=layer.rel_w[...], scale=0.5)
    return layer(x), want.reshape(x.shape)

  np.testing.assert_allclose(*got_want(layer, x), atol=1e-5)
  with pytest.raises(ValueError, match="channels"):
    layer(jnp.zeros((2, 16, 5, 7)))
