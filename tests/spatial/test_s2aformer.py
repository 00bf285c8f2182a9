"""S2AFormer Strip Self-Attention: float64 definition (attention over the
strided depth-wise reduced map, compressed Q/K channels), reference,
jit/vmap/grad, bf16, masks, errors, the SSA layer and the Hybrid Perception
Block against float64 NumPy versions of their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.strict_modes import strict_mode
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      dwconv64, gelu64, normal, softmax64)

B, H, W, N = 2, 5, 7, 2
HR, WR = 3, 4                     # ceil(5 / 2), ceil(7 / 2)
DQK, DV = 3, 5


def _ssa64(q, k, v, key_mask, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  qf = q.reshape(q.shape[0], -1, *q.shape[-2:])
  kf = k.reshape(k.shape[0], -1, *k.shape[-2:])
  vf = v.reshape(v.shape[0], -1, *v.shape[-2:])
  ok = np.asarray(key_mask).reshape(key_mask.shape[0], 1, 1, -1)
  p = softmax64(scale * np.einsum("bqnd,bknd->bnqk", qf, kf), ok)
  return np.einsum("bnqk,bknd->bqnd", p, vf).reshape(q.shape[:-1] + (v.shape[-1],))


def _reduce64(x, kernel, bias, stride):
  """out[i, j] = sum_ab kernel[a, b] x[i s + a, j s + b] (zeros outside)."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  b, h, w, c = x.shape
  kh, kw, _ = kernel.shape
  oh, ow = -(-h // stride), -(-w // stride)
  out = np.zeros((b, oh, ow, c))
  for i in range(oh):
    for j in range(ow):
      for a in range(kh):
        for e in range(kw):
          y, z = i * stride + a, j * stride + e
          if y < h and z < w:
            out[:, i, j] += kernel[a, e] * x[:, y, z]
  return out + np.asarray(bias, np.float64)


def _inputs():
  return (normal(0, (B, H, W, N, DQK)), normal(1, (B, HR, WR, N, DQK)),
          normal(2, (B, HR, WR, N, DV)))


def test_matches_float64_definition():
  q, k, v = _inputs()
  km = jax.random.bernoulli(jax.random.key(4), 0.7, (B, HR, WR))
  want = _ssa64(q, k, v, np.asarray(km), 0.7)
  both = jax.jit(lambda q, k, v, km: (
      sp.strip_self_attention(q, k, v, key_mask=km, scale=0.7),
      sp.strip_self_attention_reference(q, k, v, key_mask=km, scale=0.7),
      sp.strip_self_attention(q, k, v)))          # default scale d_qk^-0.5
  out, ref, default = both(q, k, v, km)
  for o in (out, ref):
    np.testing.assert_allclose(o, want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(
      default, _ssa64(q, k, v, np.ones((B, HR, WR), bool), DQK ** -0.5),
      atol=2e-5)


def test_values_grads_jit_vmap_bf16():
  q, k, v = _inputs()
  fn = lambda q, k, v: sp.strip_self_attention(q, k, v)
  ref = lambda q, k, v: sp.strip_self_attention_reference(q, k, v)
  check_values_grads_jit_vmap(fn, ref, (q, k, v))
  check_bf16(fn, ref, (q, k, v))


def test_masked_slots_and_empty_rows():
  q, k, v = _inputs()
  km = np.ones((B, HR, WR), bool)
  km[0, 1, 2] = False
  km[1] = False                               # batch 1: no valid key at all
  km = jnp.asarray(km)
  kn = k.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.inf)
  vn = v.at[0, 1, 2].set(jnp.nan).at[1].set(jnp.nan)
  f = lambda q, k, v: sp.strip_self_attention(q, k, v, key_mask=km)
  run = jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(
      lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)))
  with strict_mode("all"):      # no rank/dtype promotion, no inf formed
    out, g = run(q, kn, vn)
    clean = run(q, k, v)[0]
  np.testing.assert_allclose(out, clean, atol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  assert all(np.isfinite(np.asarray(x)).all() for x in g)
  np.testing.assert_array_equal(g[1][0, 1, 2], 0.0)


def test_spatial_reduction_float64():
  x = normal(5, (B, H, W, 4))
  for ks, s in ((2, 2), (3, 2)):
    kern, bias = normal(6, (ks, ks, 4)), normal(7, (4,))
    want = _reduce64(x, kern, bias, s)
    got = jax.jit(lambda x, kern, bias: (
        sp.spatial_reduction(x, kern, bias, stride=s),
        sp.spatial_reduction_reference(x, kern, bias, stride=s)))(x, kern, bias)
    for g in got:
      np.testing.assert_allclose(g, want, atol=1e-5)


def test_errors():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match=r"key_mask.*\(2, 3, 4\).*\(2, 3\)"):
    sp.strip_self_attention(q, k, v, key_mask=jnp.ones((B, HR), bool))
  with pytest.raises(ValueError, match="head_dim differ.*query=.*key="):
    sp.strip_self_attention(q, v, v)
  with pytest.raises(ValueError, match=r"kernel.*\[kh, kw, C=4\].*\(2, 2, 3\)"):
    sp.spatial_reduction(normal(0, (1, 4, 4, 4)), normal(1, (2, 2, 3)),
                         stride=2)
  with pytest.raises(ValueError, match="qk_dim.*multiple.*num_heads"):
    sp.StripSelfAttention(16, 4, qk_dim=6, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dim.*num_heads"):
    sp.StripSelfAttention(10, 4, rngs=nnx.Rngs(0))


def _lin(layer, x):
  out = x @ np.asarray(layer.kernel[...], np.float64)
  return out if layer.bias is None else out + np.asarray(layer.bias[...])


def _ln(layer, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return ((x - mu) / np.sqrt(var + layer.epsilon) * np.asarray(layer.scale[...])
          + np.asarray(layer.bias[...]))


def _layer64(m, x):
  """SSA: softmax(q(x) k(LN(DW_s(x)))^T / sqrt(d_qk)) v(LN(DW_s(x))), proj."""
  b, h, w, c = x.shape
  n = m.num_heads
  xr = _ln(m.norm, _reduce64(x, m.sr_kernel[...], m.sr_bias[...], m.sr_ratio))
  q = _lin(m.q, x).reshape(b, h, w, n, -1)
  k = _lin(m.k, xr).reshape(*xr.shape[:3], n, -1)
  v = _lin(m.v, xr).reshape(*xr.shape[:3], n, -1)
  o = _ssa64(q, k, v, np.ones(xr.shape[:3], bool), q.shape[-1] ** -0.5)
  return _lin(m.proj, o.reshape(b, h, w, c))


def _random_module(make, seed):
  """make() with every parameter drawn N(0, 0.5^2) in NumPy: no per-shape
  initializer compiles, and non-trivial biases / LayerNorm scales."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(
      lambda a: jnp.asarray(0.5 * rng.standard_normal(a.shape), a.dtype), state)
  return nnx.merge(graphdef, state)


def test_layer_and_block_float64():
  x = normal(8, (B, H, W, 16))
  x64 = np.asarray(x, np.float64)
  m = nnx.eval_shape(lambda: sp.StripSelfAttention(16, 2, rngs=nnx.Rngs(0)))
  assert (m.qk_dim, m.qk_head_dim, m.head_dim) == (4, 2, 8)   # dim // 4
  run = jax.jit(lambda m, x: m(x))
  # the block's SSA (qk_dim 8) is checked against _layer64 inside the block
  blk = _random_module(lambda: sp.HybridPerceptionBlock(
      16, 2, 2, 8, rngs=nnx.Rngs(1),
      local_module=sp.GlobalSubsampledAttention(16, 2, 1, rngs=nnx.Rngs(2))),
      0)
  local = blk.local_module
  f = dwconv64(x64, blk.dw_kernel[...], blk.dw_bias[...]) + x64
  f = f + _layer64(blk.attn, _ln(blk.norm1, f))
  f = f + np.asarray(run(local, jnp.asarray(_ln(blk.norm2, f), jnp.float32)),
                     np.float64)
  f = f + _lin(blk.fc2, gelu64(_lin(blk.fc1, _ln(blk.norm3, f))))
  np.testing.assert_allclose(run(blk, x), f, atol=2e-4, rtol=2e-4)
  # without a local module the LIM branch is absent; sr_ratio 1: no reduction
  plain = nnx.eval_shape(lambda: sp.HybridPerceptionBlock(16, 2, 1,
                                                         rngs=nnx.Rngs(1)))
  assert plain.norm2 is None and plain.attn.sr_kernel is None
  assert plain.attn.reduce(x) is x and plain.attn.norm is None
