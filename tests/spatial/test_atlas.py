"""Atlas multi-scale attention: float64 per-query definitions of top-down
(Eq. 2) and bottom-up (Eq. 3) attention, references, jit/vmap/grad, bf16,
masks, pyramid, errors, the MSA block (Algorithm 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal, softmax64)

K, S = 3, 2                  # window, stride


def _maps(b=2, h=9, w=7, n=2, kvh=1, d=4, dv=3, scales=3):
  shapes = [(h, w)]
  for _ in range(scales - 1):
    shapes.append((-(-shapes[-1][0] // S), -(-shapes[-1][1] // S)))
  q = normal(0, (b, h, w, n, d))
  ks = [normal(10 + j, (b, *hw, kvh, d)) for j, hw in enumerate(shapes)]
  vs = [normal(20 + j, (b, *hw, kvh, dv)) for j, hw in enumerate(shapes)]
  return q, ks, vs


def _attend64(q, keys, vals, ok, scale):
  p = softmax64(scale * np.array(keys) @ q, np.array(ok))
  return p @ np.array(vals)


def _top_down64(q, ks, vs, masks, scale):
  """Query (y, x) of scale 0: keys of its k x k window at scale 0 and of the
  window holding it at every coarser scale j (window index y // k // s^j)."""
  q = np.asarray(q, np.float64)
  ks, vs = [np.asarray(k, np.float64) for k in ks], [np.asarray(v, np.float64)
                                                     for v in vs]
  b_, h, w, n, _ = q.shape
  rep = n // ks[0].shape[-2]
  out = np.zeros(q.shape[:-1] + (vs[0].shape[-1],))
  for bi in range(b_):
    for y in range(h):
      for x in range(w):
        for hd in range(n):
          keys, vals, ok = [], [], []
          for j, (k, v) in enumerate(zip(ks, vs)):
            wy, wx = y // K // S ** j, x // K // S ** j
            for ky in range(wy * K, min(wy * K + K, k.shape[1])):
              for kx in range(wx * K, min(wx * K + K, k.shape[2])):
                keys.append(k[bi, ky, kx, hd // rep])
                vals.append(v[bi, ky, kx, hd // rep])
                ok.append(masks is None or bool(masks[j][bi, ky, kx]))
          out[bi, y, x, hd] = _attend64(q[bi, y, x, hd], keys, vals, ok, scale)
  return out


def _bottom_up64(q, k, v, mask, window, scale):
  """Coarse (y, x): the fine window holding fine pixel (s y, s x)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_, h, w, n, _ = q.shape
  rep = n // k.shape[-2]
  out = np.zeros(q.shape[:-1] + (v.shape[-1],))
  for bi in range(b_):
    for y in range(h):
      for x in range(w):
        wy, wx = y * S // window, x * S // window
        pix = [(a, c) for a in range(wy * window, min(wy * window + window,
                                                      k.shape[1]))
               for c in range(wx * window, min(wx * window + window,
                                               k.shape[2]))]
        for hd in range(n):
          out[bi, y, x, hd] = _attend64(
              q[bi, y, x, hd], [k[bi, a, c, hd // rep] for a, c in pix],
              [v[bi, a, c, hd // rep] for a, c in pix],
              [mask is None or bool(mask[bi, a, c]) for a, c in pix], scale)
  return out


def test_top_down_and_bottom_up_match_float64_definitions():
  q, ks, vs = _maps()
  masks = [jax.random.bernoulli(jax.random.key(30 + j), 0.75, k.shape[:3])
           for j, k in enumerate(ks)]
  td = jax.jit(lambda q, ks, vs, m: sp.multiscale_top_down_attention(
      q, ks, vs, K, stride=S, key_masks=m))(q, ks, vs, masks)
  np.testing.assert_allclose(
      td, _top_down64(q, ks, vs, [np.asarray(m) for m in masks], 0.5),
      atol=2e-5, rtol=2e-5)
  qc = normal(5, (2, 5, 4, 2, 4))
  bu = jax.jit(lambda *a: sp.multiscale_bottom_up_attention(
      *a, 4, stride=S, key_mask=masks[0]))(qc, ks[0], vs[0])
  np.testing.assert_allclose(
      bu, _bottom_up64(qc, ks[0], vs[0], np.asarray(masks[0]), 4, 0.5),
      atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap_bf16():
  """Top-down and bottom-up in one function (one compile per check)."""
  q, ks, vs = _maps(b=1, h=5, w=4, kvh=2, scales=2)
  qc = normal(6, (1, 3, 2, 2, 4))

  def both(td, bu):
    return lambda q, k0, k1, v0, v1, qc: jnp.concatenate([
        td(q, [k0, k1], [v0, v1], K, stride=S).ravel(),
        bu(qc, k0, v0, 4, stride=S).ravel()])

  fn = jax.jit(both(sp.multiscale_top_down_attention,
                    sp.multiscale_bottom_up_attention))
  ref = jax.jit(both(sp.multiscale_top_down_attention_reference,
                     sp.multiscale_bottom_up_attention_reference))
  args = (q, ks[0], ks[1], vs[0], vs[1], qc)
  check_values_grads_jit_vmap(fn, ref, args, batched=(0, 1, 2, 3, 4, 5))
  check_bf16(fn, ref, args, batched=(0, 1, 2, 3, 4, 5))


def test_masked_keys_never_reach_output_and_empty_rows_are_zero():
  q, ks, vs = _maps(scales=2)
  masks = [np.ones(k.shape[:3], bool) for k in ks]
  masks[0][0, 2, 1] = masks[1][0, 1, 1] = False
  masks[0][1] = masks[1][1] = False                  # batch 1: nothing valid
  masks = [jnp.asarray(m) for m in masks]
  poison = lambda x, m: jnp.where(m[..., None, None], x, jnp.nan)
  kn, vn = [poison(k, m) for k, m in zip(ks, masks)], [
      poison(v, m) for v, m in zip(vs, masks)]
  f = jax.jit(lambda ks, vs: sp.multiscale_top_down_attention(
      q, ks, vs, K, stride=S, key_masks=masks))
  out = f(kn, vn)
  np.testing.assert_allclose(out, f(ks, vs), atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  g = jax.grad(lambda ks, vs: f(ks, vs).sum(), argnums=(0, 1))(kn, vn)
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(g))
  qc = normal(5, (2, 5, 4, 2, 4))
  fb = jax.jit(lambda k, v: sp.multiscale_bottom_up_attention(
      qc, k, v, 4, stride=S, key_mask=masks[0]))
  ob = fb(kn[0], vn[0])
  np.testing.assert_allclose(ob, fb(ks[0], vs[0]), atol=1e-6)
  np.testing.assert_array_equal(ob[1], 0.0)


def test_single_scale_is_window_attention_and_pyramid_is_max_pool():
  q, ks, vs = _maps(b=1, scales=1, kvh=2, dv=4)
  np.testing.assert_allclose(
      *jax.jit(lambda q, k, v: (
          sp.multiscale_top_down_attention(q, [k], [v], K, stride=S),
          sp.window_attention(q, k, v, K)))(q, ks[0], vs[0]), atol=1e-5)
  x = normal(8, (1, 5, 7, 3))
  pyr = sp.multiscale_pyramid(x, stride=2, window_size=2)
  xn = np.asarray(x, np.float64)
  assert [p.shape[1:3] for p in pyr] == [(5, 7), (3, 4), (2, 2)]
  want = np.full((1, 3, 4, 3), -np.inf)
  for y in range(5):
    for c in range(7):
      want[0, y // 2, c // 2] = np.maximum(want[0, y // 2, c // 2], xn[0, y, c])
  np.testing.assert_allclose(pyr[1], want, atol=0)


def test_errors():
  q, ks, vs = _maps(scales=2)
  with pytest.raises(ValueError, match="keys\\[1\\].*\\(5, 4\\).*\\(2, 4, 4"):
    sp.multiscale_top_down_attention(q, [ks[0], ks[1][:, :4]],
                                     [vs[0], vs[1][:, :4]], K, stride=S)
  with pytest.raises(ValueError, match="same length"):
    sp.multiscale_top_down_attention(q, ks, vs[:1], K, stride=S)
  with pytest.raises(ValueError, match="key_masks\\[0\\].*\\(2, 9, 7\\)"):
    sp.multiscale_top_down_attention(q, ks, vs, K, stride=S,
                                     key_masks=[jnp.ones((2, 9), bool), None])
  with pytest.raises(ValueError, match="multiple of `stride`"):
    sp.multiscale_bottom_up_attention(q[:, :5, :4], ks[0], vs[0], 3, stride=2)
  with pytest.raises(ValueError, match="coarser scale.*\\(5, 4\\)"):
    sp.multiscale_bottom_up_attention(q, ks[0], vs[0], 4, stride=2)
  with pytest.raises(ValueError, match="implementation"):
    sp.multiscale_top_down_attention(q, ks, vs, K, stride=S,
                                     implementation="nope")


def test_msa_block_follows_algorithm_1():
  dim, heads = 8, 2
  layer = sp.MultiScaleAttention(dim, heads, 3, window_size=4, stride=2,
                                 rngs=nnx.Rngs(0))
  n = sum(a.size for a in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n == 3 * (4 * dim + 4 * dim * dim + 4 * dim)
  x = normal(9, (1, 9, 10, dim))

  def pool(a):                                # float64-free ceil max-pool
    h, w = -(-a.shape[1] // 2) * 2, -(-a.shape[2] // 2) * 2
    a = jnp.pad(a, [(0, 0), (0, h - a.shape[1]), (0, w - a.shape[2]), (0, 0)],
                constant_values=-jnp.inf)
    return a.reshape(1, h // 2, 2, w // 2, 2, dim).max((2, 4))

  @nnx.jit
  def run(layer, x):
    sc = layer.scales
    heads_ = lambda a: a.reshape(*a.shape[:-1], heads, -1)
    kv = lambda l, a: (heads_(sc[l].kv(sc[l].norm_kv(a))[..., :dim]),
                       heads_(sc[l].kv(sc[l].norm_kv(a))[..., dim:]))
    xs = [x, pool(x), pool(pool(x))]
    xs[1] = xs[1] + pool(xs[0])
    xs[2] = xs[2] + pool(xs[1])
    for l in (2, 1, 0):
      q = heads_(sc[l].q(sc[l].norm_q(xs[l])))
      kvs = [kv(m, xs[m]) for m in range(l, 3)]
      o = sp.multiscale_top_down_attention_reference(
          q, [a for a, _ in kvs], [b for _, b in kvs], 4, stride=2)
      xs[l] = xs[l] + sc[l].proj(o.reshape(xs[l].shape))
    for l in (1, 2):
      q = heads_(sc[l].q(sc[l].norm_q(xs[l])))
      o = sp.multiscale_bottom_up_attention_reference(q, *kv(l - 1, xs[l - 1]),
                                                      4, stride=2)
      xs[l] = xs[l] + sc[l].proj(o.reshape(xs[l].shape))
    return layer(x), xs

  got, want = run(layer, x)
  assert [g.shape for g in got] == [(1, 9, 10, 8), (1, 5, 5, 8), (1, 3, 3, 8)]
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5)
  with pytest.raises(ValueError, match="channels"):
    layer(jnp.zeros((1, 8, 9, 10)))
