"""Pallas flash attention: shared softmax suite + kernel-level checks.

On CPU the kernels run in Pallas interpret mode, so shapes are tiny.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from pallas_kernels import flash as fa
from tests.softmax_base import SoftmaxAttentionSuite


class TestPallasBackend(SoftmaxAttentionSuite):
  implementation = "pallas"
  supports_soft_cap = supports_sinks = False      # refused by the backend
  supports_positions = supports_precision = False


# ---------------------------------------------------------------------------
# Kernel-level checks of pallas_kernels.flash_attention against its own
# plain-jnp reference (mha_reference) and against attnjax's 'xla' backend.
# ---------------------------------------------------------------------------

def _rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


def _vg(fn, q, k, v, bias, dout, dlse):
  """Loss touching both outputs, so dlse flows through the custom_vjp."""

  def loss(q, k, v, bias):
    out, lse = fn(q, k, v, bias)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (jnp.sum(out.astype(jnp.float32) * dout)
            + jnp.sum(lse * dlse))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  return jax.jit(jax.value_and_grad(loss, argnums=argnums))(q, k, v, bias)


CASES = {
    # name: (dtype, (B, T, S, N, K, H), kwargs, block sizes, heads_major)
    "f32_causal_gqa_bias_ragged": (
        jnp.float32, (1, 37, 45, 4, 2, 16),
        dict(is_causal=True, bias=True), fa.BlockSizes(16, 16, 16, 8), False),
    "bf16_window_mask_segments": (
        jnp.bfloat16, (2, 21, 21, 2, 1, 16),
        dict(local_window_size=(5, 2), mask=True, segments=True),
        fa.BlockSizes(8, 16, 16, 8), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_flash_values_grads_lse_vs_reference(name):
  dtype, (b, t, s, n, kh, h), kw, bs, heads_major = CASES[name]
  q, k, v = (_rand(0, (b, t, n, h), dtype), _rand(1, (b, s, kh, h), dtype),
             _rand(2, (b, s, kh, h), dtype))
  kw = dict(kw)
  bias = _rand(3, (1, n, t, s)) if kw.pop("bias", False) else None
  if kw.pop("mask", False):
    m = np.random.default_rng(4).random((b, 1, t, s)) < 0.7
    m[0, :, 3, :] = False                       # a fully masked row
    kw["mask"] = jnp.asarray(m)
  if kw.pop("segments", False):
    kw["q_segment_ids"] = jnp.asarray(np.repeat([[0] * 10 + [1] * (t - 10)],
                                                b, 0))
    kw["kv_segment_ids"] = jnp.asarray(np.repeat([[0] * 12 + [1] * (s - 12)],
                                                 b, 0))
  dout = _rand(5, (b, t, n, h))
  dlse = _rand(6, (b, n, t))
  kern = lambda q, k, v, bias: fa.flash_attention(
      q, k, v, bias=bias, block_sizes=bs, heads_major=heads_major,
      return_lse=True, **kw)
  ref = lambda q, k, v, bias: fa.mha_reference(q, k, v, bias=bias,
                                               return_lse=True, **kw)
  out, lse = jax.jit(kern)(q, k, v, bias)
  rout, rlse = ref(q.astype(jnp.float32), k.astype(jnp.float32),
                   v.astype(jnp.float32), bias)
  assert out.dtype == dtype and out.shape == (b, t, n, h)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), rout, atol=tol,
                             rtol=tol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(rlse))
  fin = np.isfinite(rlse)
  np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(rlse)[fin],
                             atol=10 * tol, rtol=tol)
  if "mask" in kw:
    assert np.all(np.asarray(out[0, 3], np.float32) == 0.0)
  (val, grads) = _vg(kern, q, k, v, bias, dout, dlse)
  f32 = lambda x: None if x is None else x.astype(jnp.float32)
  (rval, rgrads) = _vg(ref, f32(q), f32(k), f32(v), bias, dout, dlse)
  gtol = 1e-4 if dtype == jnp.float32 else 5e-2
  for g, rg in zip(grads, rgrads):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
    assert _rel(g, rg) < gtol, _rel(g, rg)


def test_flash_matches_attnjax_xla_backend():
  q, k, v = _rand(10, (1, 24, 2, 16)), _rand(11, (1, 30, 2, 16)), _rand(
      12, (1, 30, 2, 16))
  out = fa.flash_attention(q, k, v, is_causal=True, local_window_size=7,
                           block_sizes=fa.BlockSizes(8, 8, 8, 8))
  ref = attnjax.dot_product_attention(q, k, v, is_causal=True,
                                      local_window_size=7,
                                      implementation="xla")
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_window_skips_tiles_outside_band():
  # Keys outside the band are never read: NaNs planted there stay invisible.
  t = s = 64
  q, k, v = _rand(13, (1, t, 1, 16)), _rand(14, (1, s, 1, 16)), _rand(
      15, (1, s, 1, 16))
  v_nan = v.at[:, 40:].set(jnp.nan)
  bs = fa.BlockSizes(8, 8, 8, 8)
  out = fa.flash_attention(q, k, v_nan, local_window_size=(4, 0),
                           block_sizes=bs)
  ref = fa.mha_reference(q, k, v, local_window_size=(4, 0))
  np.testing.assert_allclose(out[:, :32], ref[:, :32], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("h", [64, 128, 256])
def test_head_dims(h):
  q, k, v = (_rand(20, (1, 40, 2, h), jnp.bfloat16),
             _rand(21, (1, 40, 1, h), jnp.bfloat16),
             _rand(22, (1, 40, 1, h), jnp.bfloat16))
  f = lambda q, k, v: jnp.sum(fa.flash_attention(q, k, v, is_causal=True)
                              .astype(jnp.float32) ** 2)
  fr = lambda q, k, v: jnp.sum(fa.mha_reference(q, k, v, is_causal=True)
                               .astype(jnp.float32) ** 2)
  g = jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v)
  f32 = lambda x: x.astype(jnp.float32)
  gr = jax.grad(fr, (0, 1, 2))(f32(q), f32(k), f32(v))
  for a, b in zip(g, gr):
    assert _rel(a, b) < 5e-2


def test_block_sizes_and_value_errors():
  assert fa.BlockSizes.get_default("gpu", 256).block_q <= 64
  assert fa.BlockSizes.get_default("tpu").block_q >= 128
  with pytest.raises(ValueError, match="block_q"):
    fa.BlockSizes(block_q=0)
  q = jnp.zeros((1, 8, 4, 16))
  k = jnp.zeros((1, 9, 2, 16))
  with pytest.raises(ValueError, match="query"):
    fa.flash_attention(q[0], k, k)
  with pytest.raises(ValueError, match="head_dim"):
    fa.flash_attention(q, k[..., :8], k[..., :8])
  with pytest.raises(ValueError, match="kv heads"):
    fa.flash_attention(q[:, :, :3], k, k)
  with pytest.raises(ValueError, match="bias"):
    fa.flash_attention(q, k, k, bias=jnp.zeros((8, 8)))
  with pytest.raises(ValueError, match="mask"):
    fa.flash_attention(q, k, k, mask=jnp.ones((8, 9), jnp.int32))
  with pytest.raises(ValueError, match="q_segment_ids"):
    fa.flash_attention(q, k, k, q_segment_ids=jnp.zeros((1, 7), jnp.int32),
                       kv_segment_ids=jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="local_window_size"):
    fa.flash_attention(q, k, k, local_window_size=(-1, 2))


# --------------------------------------------- masked slots, edge inputs
def test_flash_attention_masked_slots_never_leak():
  """pallas_kernels.flash_attention directly: NaN / Inf in key/value slots
  that no query can attend (padding segment, all-False mask column, keys
  past every causal reach) change no output and no gradient; the gradients
  at those slots are exactly zero. Also under jax.debug_infs."""
  from tests.strict_modes import strict_mode
  b, t, s, n, kh, h = 2, 6, 11, 2, 1, 8
  q = _rand(0, (b, t, n, h))
  k = np.asarray(_rand(1, (b, s, kh, h)))
  v = np.asarray(_rand(2, (b, s, kh, h)))
  qseg = np.zeros((b, t), np.int32)
  kvseg = np.zeros((b, s), np.int32)
  kvseg[0, 8:] = -1                       # a padding segment
  mask = np.ones((b, 1, t, s), bool)
  mask[1, :, :, 3] = False                # an all-False column
  dead = (kvseg == -1) | (np.arange(s) >= t)[None, :]   # causal, S > T
  dead[1, 3] = True
  kb, vb = k.copy(), v.copy()
  kb[dead] = np.nan
  vb[dead] = np.inf
  dout = _rand(3, (b, t, n, h))
  kw = dict(is_causal=True, mask=jnp.asarray(mask),
            q_segment_ids=jnp.asarray(qseg), kv_segment_ids=jnp.asarray(kvseg))

  def run(k, v):
    f = lambda q, k, v: jnp.sum(fa.flash_attention(q, k, v, **kw) * dout)
    with strict_mode("debug_infs"):
      out = fa.flash_attention(q, k, v, **kw)
      grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    return out, grads

  out0, g0 = run(jnp.asarray(k), jnp.asarray(v))
  ref = fa.mha_reference(q, jnp.asarray(k), jnp.asarray(v), **kw)
  np.testing.assert_allclose(out0, ref, atol=2e-5)
  out1, g1 = run(jnp.asarray(kb), jnp.asarray(vb))
  np.testing.assert_array_equal(out1, out0)
  for a, c in zip(g1, g0):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(a, c, atol=1e-6)
  assert np.all(np.asarray(g1[1])[dead] == 0) and np.all(
      np.asarray(g1[2])[dead] == 0)


def test_flash_attention_edge_arguments():
  q = _rand(4, (1, 5, 2, 8))
  k = _rand(5, (1, 7, 2, 8))
  ref = fa.mha_reference(q, k, k, local_window_size=(2, 1))
  np.testing.assert_allclose(
      fa.flash_attention(q, k, k, local_window_size=(np.int64(2),
                                                     np.int32(1))),
      ref, atol=2e-5)
  # "Unbounded" windows: no int32 overflow, same as no window.
  np.testing.assert_allclose(
      fa.flash_attention(q, k, k, local_window_size=2**31),
      fa.mha_reference(q, k, k), atol=2e-5)
  for bad in ((2.5, 2.5), 1.5, (1, True)):
    with pytest.raises(ValueError, match="local_window_size"):
      fa.flash_attention(q, k, k, local_window_size=bad)
  with pytest.raises(ValueError, match="scale"):
    fa.flash_attention(q, k, k, scale=float("nan"))
  # Empty batch / sequences: zeros of the right shape, lse -inf.
  for qs, ks in (((0, 5, 2, 8), (0, 7, 2, 8)), ((1, 0, 2, 8), (1, 7, 2, 8)),
                 ((1, 5, 2, 8), (1, 0, 2, 8))):
    out, lse = fa.flash_attention(jnp.ones(qs), jnp.ones(ks), jnp.ones(ks),
                                  is_causal=True, return_lse=True)
    assert out.shape == qs and not np.any(np.asarray(out))
    assert lse.shape == (qs[0], qs[2], qs[1])
    assert np.all(np.isneginf(np.asarray(lse)))
