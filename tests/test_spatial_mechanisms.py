"""Axial, CSWin, Twins/HiLo, BiFormer, DaViT channel, ConViT GPSA, CrossViT:
values and gradients vs the dense references, bf16, jit/vmap, errors, layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_values_grads_jit_vmap,
                                       value_and_grad0)

F32 = lambda x: x.astype(jnp.float32)


def _qkv(shape, kv_heads=None, dtype=jnp.float32, hv=None):
  ks = jax.random.split(jax.random.key(0), 3)
  kshape = shape[:-2] + ((kv_heads or shape[-2]), shape[-1])
  vshape = kshape[:-1] + ((hv or shape[-1]),)
  return (jax.random.normal(ks[0], shape, dtype),
          jax.random.normal(ks[1], kshape, dtype),
          jax.random.normal(ks[2], vshape, dtype))


_PW = jax.random.normal(jax.random.key(4), (3, 4))
_PB = jax.random.normal(jax.random.key(5), (4,))
_G = jax.random.normal(jax.random.key(6), (4,))
_LK = jax.random.normal(jax.random.key(7), (3, 3, 4, 3))
_LB = jax.random.normal(jax.random.key(8), (4, 3))

# name -> (fn, reference, input shape, kv_heads)
MECHS = {
    "axial0_causal": (lambda q, k, v: sp.axial_attention(q, k, v, 0, is_causal=True),
                      lambda q, k, v: sp.axial_attention_reference(
                          q, k, v, 0, is_causal=True), (2, 5, 6, 4, 3), 2),
    "axial1_3d": (lambda q, k, v: sp.axial_attention(q, k, v, -1),
                  lambda q, k, v: sp.axial_attention_reference(q, k, v, 2),
                  (1, 3, 4, 5, 2, 3), None),
    "cswin_lepe": (lambda q, k, v: sp.cross_shaped_window_attention(
        q, k, v, 2, lepe_kernel=_LK, lepe_bias=_LB),
                   lambda q, k, v: sp.cross_shaped_window_attention_reference(
                       q, k, v, 2, lepe_kernel=_LK, lepe_bias=_LB),
                   (2, 5, 7, 4, 3), None),
    "hilo_lofi": (lambda q, k, v: sp.pooled_attention(q, k, v, (2, 3)),
                  lambda q, k, v: sp.pooled_attention_reference(q, k, v, (2, 3)),
                  (2, 5, 7, 4, 3), 2),
    "biformer": (lambda q, k, v: sp.bi_level_routing_attention(q, k, v, 3, 2),
                 lambda q, k, v: sp.bi_level_routing_attention_reference(
                     q, k, v, 3, 2), (2, 7, 8, 4, 3), None),
    "channel": (sp.channel_attention, sp.channel_attention_reference,
                (2, 5, 6, 4, 3), None),
    "gpsa": (lambda q, k, v: sp.gated_positional_attention(q, k, v, _PW, _PB, _G),
             lambda q, k, v: sp.gated_positional_attention_reference(
                 q, k, v, _PW, _PB, _G), (2, 4, 5, 4, 3), None),
    "crossvit": (sp.cls_cross_attention, sp.cls_cross_attention_reference,
                 None, None),
}


def _inputs(name, dtype=jnp.float32):
  if name == "crossvit":
    q, _, _ = _qkv((2, 1, 4, 3), dtype=dtype)
    _, k, v = _qkv((2, 9, 4, 3), kv_heads=2, dtype=dtype)
    return q, k, v
  _, _, shape, kvh = MECHS[name]
  return _qkv(shape, kv_heads=kvh, dtype=dtype)


@pytest.mark.parametrize("name", list(MECHS))
def test_values_grads_jit_vmap(name):
  fn, ref, _, _ = MECHS[name]
  q, k, v = _inputs(name)
  # fn under jit(vmap(vjp)) (jit, vmap, values and grads: one compile), ref
  # under jit(vjp); same tolerances as the three separate checks had
  check_values_grads_jit_vmap(fn, ref, (q, k, v), atol=1e-5, grad_atol=2e-5)


@pytest.mark.parametrize("name", ["cswin_lepe", "biformer", "gpsa", "hilo_lofi"])
def test_bfloat16(name):
  fn, ref, _, _ = MECHS[name]
  q, k, v = _inputs(name, jnp.bfloat16)
  # values and d sum / dq, each side from one jit(vjp) (was eager)
  out, g = value_and_grad0(fn, (q, k, v))
  assert out.dtype == jnp.bfloat16
  want, gr = value_and_grad0(ref, (F32(q), F32(k), F32(v)))
  np.testing.assert_allclose(F32(out), want, atol=5e-2, rtol=5e-2)
  np.testing.assert_allclose(F32(g), gr, atol=1e-1, rtol=1e-1)


def test_axial_is_row_and_column():
  q, k, v = _qkv((1, 4, 5, 1, 2))
  v = jnp.zeros_like(v).at[0, 1, 2].set(1.0)
  nz = lambda o: {tuple(x) for x in np.argwhere(np.abs(np.asarray(o[0, ..., 0, 0])) > 0)}
  assert nz(sp.axial_attention(q, k, v, 0)) == {(i, 2) for i in range(4)}
  assert nz(sp.axial_attention(q, k, v, 1)) == {(1, j) for j in range(5)}


def test_cswin_heads_see_a_cross():
  q, k, v = _qkv((1, 6, 6, 2, 2))
  v = jnp.zeros_like(v).at[0, 2, 3].set(1.0)
  out = sp.cross_shaped_window_attention(q, k, v, 2)
  nz = lambda h: {tuple(x) for x in np.argwhere(np.abs(np.asarray(out[0, ..., h, 0])) > 0)}
  assert nz(0) == {(i, j) for i in range(6) for j in (2, 3)}   # vertical stripe
  assert nz(1) == {(i, j) for i in (2, 3) for j in range(6)}   # horizontal stripe


def test_biformer_routes_topk_regions():
  q, k, _ = _qkv((1, 6, 6, 2, 4))
  idx = sp.region_routing(q, k, 3, 2, 0.5)
  assert idx.shape == (1, 9, 2)
  qr = q.reshape(1, 3, 2, 3, 2, 8).mean((2, 4)).reshape(1, 9, 8)
  kr = k.reshape(1, 3, 2, 3, 2, 8).mean((2, 4)).reshape(1, 9, 8)
  aff = np.asarray(qr[0] @ kr[0].T)
  want = np.argsort(-aff, -1)[:, :2]
  np.testing.assert_array_equal(np.sort(idx[0], -1), np.sort(want, -1))
  # topk = all regions equals full attention.
  q, k, v = _qkv((1, 5, 6, 2, 3))
  full = sp.bi_level_routing_attention(q, k, v, 2, 4)
  dense = sp.subsampled_attention(q, k, v)
  np.testing.assert_allclose(full, dense, atol=1e-5)


def test_gpsa_convolutional_init_is_local():
  w = sp.convolutional_init(9, locality_strength=20.0)
  q, k, v = _qkv((1, 5, 5, 9, 1))
  gate = jnp.full((9,), 50.0)                 # purely positional
  v = jnp.arange(25.0).reshape(1, 5, 5, 1, 1) * jnp.ones((1, 1, 1, 9, 1))
  out = sp.gated_positional_attention(q, k, v, jnp.asarray(w), None, gate)
  # Head h1 + 3 h2 copies the value at offset (h1 - 1, h2 - 1) from (2, 2).
  for h1 in range(3):
    for h2 in range(3):
      want = (2 + h1 - 1) * 5 + (2 + h2 - 1)
      np.testing.assert_allclose(out[0, 2, 2, h1 + 3 * h2, 0], want, atol=1e-3)


def test_average_pool_partial_windows():
  x = jnp.arange(5.0).reshape(1, 5, 1)
  np.testing.assert_allclose(sp.average_pool(x, (2,))[0, :, 0], [0.5, 2.5, 4.0])


def test_errors():
  q, k, v = _qkv((1, 4, 4, 2, 3))
  with pytest.raises(ValueError, match="axis"):
    sp.axial_attention(q, k, v, 2)
  with pytest.raises(ValueError, match="topk"):
    sp.bi_level_routing_attention(q, k, v, 2, 5)
  with pytest.raises(ValueError, match="num_regions"):
    sp.bi_level_routing_attention(q, k, v, 0, 1)
  with pytest.raises(ValueError, match="pos_weight.*\\(3, 2\\)"):
    sp.gated_positional_attention(q, k, v, jnp.zeros((2, 2)), None, jnp.zeros(2))
  with pytest.raises(ValueError, match="gate"):
    sp.gated_positional_attention(q, k, v, jnp.zeros((3, 2)), None, jnp.zeros(3))
  with pytest.raises(ValueError, match="identical shape"):
    sp.channel_attention(q, k[..., :1, :], v[..., :1, :])
  with pytest.raises(ValueError, match="lepe_kernel"):
    sp.stripe_attention(q, k, v, 2, "vertical", lepe_kernel=jnp.zeros((3, 3, 2)))
  with pytest.raises(ValueError, match="orientation"):
    sp.stripe_attention(q, k, v, 2, "diagonal")
  with pytest.raises(ValueError, match="even number of heads"):
    sp.cross_shaped_window_attention(q[..., :1, :], k[..., :1, :], v[..., :1, :], 2)
  with pytest.raises(ValueError, match="pool_size"):
    sp.pooled_attention(q, k, v, (2, 2, 2))
  with pytest.raises(ValueError, match="query"):
    sp.cls_cross_attention(q, k, v)


def _nparams(m):
  return sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))


def test_layers_param_counts_and_shapes():
  c, h = 16, 4
  r = nnx.Rngs(0)
  lin = lambda i, o, b=True: i * o + (o if b else 0)
  x = jax.random.normal(jax.random.key(3), (2, 7, 9, c))
  cases = [
      (sp.AxialAttention(c, h, rngs=r), 2 * (lin(c, 3 * c) + lin(c, c))),
      (sp.AxialAttention(c, h, combine="sum", rngs=r), 2 * (lin(c, 3 * c) + lin(c, c))),
      (sp.CSWinAttention(c, h, 3, rngs=r), lin(c, 3 * c) + lin(c, c) + 9 * c + c),
      (sp.CSWinAttention(c, h, 3, last_stage=True, rngs=r),
       lin(c, 3 * c) + lin(c, c) + 9 * c + c),
      (sp.LocallyGroupedAttention(c, h, 4, rngs=r), lin(c, 3 * c) + lin(c, c)),
      (sp.GlobalSubsampledAttention(c, h, 2, rngs=r),
       lin(c, c) + lin(c, 2 * c) + lin(c, c) + 4 * c * c + c + 2 * c),
      # HiLo alpha=0.5, 4 heads of 4: 2 Lo-Fi heads (l_dim 8), 2 Hi-Fi (h_dim 8).
      (sp.HiLoAttention(c, h, 2, 0.5, rngs=r),
       lin(c, 8, False) + lin(c, 16, False) + lin(8, 8) + lin(c, 24, False) + lin(8, 8)),
      (sp.BiLevelRoutingAttention(c, h, 3, 4, rngs=r),
       lin(c, 3 * c) + lin(c, c) + 25 * c + c),
      (sp.ChannelAttention(c, h, rngs=r), lin(c, 3 * c) + lin(c, c)),
      (sp.GPSA(c, h, rngs=r), lin(c, 2 * c, False) + lin(c, c, False) + lin(c, c)
       + lin(3, h) + h),
  ]
  # one compiled forward per layer (eager, each op of a layer was compiled
  # on its own: most of this test's time)
  fwd = nnx.jit(lambda layer, x: layer(x))
  for layer, want in cases:
    assert _nparams(layer) == want, type(layer).__name__
    y = fwd(layer, x)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
  # GPSA local init: v is the identity.
  g = sp.GPSA(c, h, rngs=r)
  np.testing.assert_array_equal(g.v.kernel[...], np.eye(c))
  att = sp.CrossViTAttention(c, h, rngs=r)
  assert _nparams(att) == 3 * lin(c, c, False) + lin(c, c)
  tok = jax.random.normal(jax.random.key(1), (2, 10, c))
  assert fwd(att, tok).shape == (2, 1, c)
  fus = sp.CrossViTFusion(8, c, h, rngs=r)
  out = nnx.jit(lambda f, a, b: f(a, b))(
      fus, jax.random.normal(jax.random.key(2), (2, 5, 8)), tok)
  assert out.shape == (2, 5, 8)
  np.testing.assert_array_equal(out[:, 1:], jax.random.normal(
      jax.random.key(2), (2, 5, 8))[:, 1:])


def test_layers_match_functional():
  c, h = 16, 4
  x = jax.random.normal(jax.random.key(3), (2, 5, 7, c))
  layer = sp.BiLevelRoutingAttention(c, h, 2, 3, rngs=nnx.Rngs(0))
  qkv = layer.qkv(x).reshape(2, 5, 7, 3, h, 4)
  q, k, v = (qkv[..., i, :, :] for i in range(3))
  o = sp.bi_level_routing_attention_reference(q, k, v, 2, 3, scale=c ** -0.5)
  want = layer.wo(o.reshape(x.shape) + layer.lepe(v.reshape(x.shape)))
  np.testing.assert_allclose(layer(x), want, atol=1e-5)
  cs = sp.CSWinAttention(c, h, 2, rngs=nnx.Rngs(0))
  qkv = cs.qkv(x).reshape(2, 5, 7, 3, h, 4)
  q, k, v = (qkv[..., i, :, :] for i in range(3))
  o = sp.cross_shaped_window_attention_reference(
      q, k, v, 2, lepe_kernel=cs.lepe_kernel[...].reshape(3, 3, h, 4),
      lepe_bias=cs.lepe_bias[...].reshape(h, 4))
  np.testing.assert_allclose(cs(x), cs.proj(o.reshape(x.shape)), atol=1e-5)
