"""VAN large-kernel attention: float64 (scipy) definition, reference,
jit/vmap/grad, bf16, errors, layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      dwconv64, gelu64, normal)

C = 4


def _args():
  return (normal(0, (2, 9, 11, C)), 0.3 * normal(1, (5, 5, C)),
          normal(2, (C,)), 0.3 * normal(3, (3, 3, C)), normal(4, (C,)),
          normal(5, (C, C)), normal(6, (C,)))


def test_matches_float64_definition():
  x, k0, b0, k1, b1, pw, pb = _args()
  a = dwconv64(x, k0, b0)
  a = dwconv64(a, k1, b1, dilation=3)
  want = (a @ np.asarray(pw, np.float64) + np.asarray(pb)) * np.asarray(x)
  for f in (sp.large_kernel_attention, sp.large_kernel_attention_reference):
    np.testing.assert_allclose(f(x, k0, b0, k1, b1, pw, pb, dilation=3), want,
                               atol=1e-4, rtol=1e-4)


def test_values_grads_jit_vmap_and_bf16():
  args = _args()
  fn = lambda *a: sp.large_kernel_attention(*a, dilation=2)
  ref = lambda *a: sp.large_kernel_attention_reference(*a, dilation=2)
  check_values_grads_jit_vmap(fn, ref, args, batched=tuple(range(7)),
                              atol=5e-5)
  x, *rest = args
  check_bf16(lambda x: fn(x, *[r.astype(x.dtype) for r in rest]),
             lambda x: ref(x, *rest), (x,), batched=(0,), atol=1.5e-1)


def test_errors():
  x, k0, b0, k1, b1, pw, pb = _args()
  with pytest.raises(ValueError, match="dw_kernel.*\\(4, 4, 4\\)"):
    sp.large_kernel_attention(x, k0[:4, :4], b0, k1, b1, pw, pb)
  with pytest.raises(ValueError, match="pw_kernel"):
    sp.large_kernel_attention(x, k0, b0, k1, b1, pw[:2], pb)
  with pytest.raises(ValueError, match="dwd_bias"):
    sp.large_kernel_attention(x, k0, b0, k1, b1[:2], pw, pb)
  with pytest.raises(ValueError, match="`x`"):
    sp.large_kernel_attention(x[0], k0, b0, k1, b1, pw, pb)
  with pytest.raises(ValueError, match="dilation"):
    sp.large_kernel_attention(x, k0, b0, k1, b1, pw, pb, dilation=0)


def test_layers():
  lka = sp.LargeKernelAttention(8, rngs=nnx.Rngs(0))
  n = sum(v.size for v in jax.tree.leaves(nnx.state(lka, nnx.Param)))
  assert n == 25 * 8 + 8 + 49 * 8 + 8 + 64 + 8          # VAN's LKA
  x = normal(7, (1, 6, 7, 8))
  want = sp.large_kernel_attention_reference(
      x, lka.conv0_kernel[...], lka.conv0_bias[...],
      lka.conv_spatial_kernel[...], lka.conv_spatial_bias[...],
      lka.conv1.kernel[...], lka.conv1.bias[...], dilation=3)
  np.testing.assert_allclose(lka(x), want, atol=1e-5)
  van = sp.VANAttention(8, rngs=nnx.Rngs(1))
  y = np.asarray(van.proj_1(x), np.float64)
  u = van.spatial_gating_unit(jnp.asarray(gelu64(y), jnp.float32))
  np.testing.assert_allclose(van(x), van.proj_2(u) + x, atol=1e-5)
