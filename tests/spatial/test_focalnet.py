"""FocalNet focal modulation: float64 (scipy) definition, reference,
jit/vmap/grad, bf16, errors, layer."""

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
  x = normal(0, (2, 6, 7, 2 * C + 3))
  return (x[..., :C], x[..., C:2 * C], x[..., 2 * C:],
          (0.4 * normal(1, (3, 3, C)), 0.3 * normal(2, (5, 5, C))),
          normal(3, (C, C)), normal(4, (C,)))


def _focal64(q, ctx, gates, kernels, hk, hb, normalize):
  q, ctx, gates = (np.asarray(a, np.float64) for a in (q, ctx, gates))
  agg = 0
  c = ctx
  for l, k in enumerate(kernels):
    c = gelu64(dwconv64(c, k))
    agg = agg + c * gates[..., l:l + 1]
  agg = agg + gelu64(c.mean((1, 2), keepdims=True)) * gates[..., len(kernels):]
  if normalize:
    agg = agg / (len(kernels) + 1)
  return q * (agg @ np.asarray(hk, np.float64) + np.asarray(hb, np.float64))


@pytest.mark.parametrize("normalize", [False, True])
def test_matches_float64_definition(normalize):
  args = _args()
  want = _focal64(*args, normalize)
  for f in (sp.focal_modulation, sp.focal_modulation_reference):
    np.testing.assert_allclose(f(*args, normalize_modulator=normalize), want,
                               atol=2e-5, rtol=2e-5)


def test_values_grads_jit_vmap_and_bf16():
  q, ctx, g, ks, hk, hb = _args()
  fn = lambda q, ctx, g, k0, k1, hk, hb: sp.focal_modulation(q, ctx, g, (k0, k1),
                                                             hk, hb)
  ref = lambda q, ctx, g, k0, k1, hk, hb: sp.focal_modulation_reference(
      q, ctx, g, (k0, k1), hk, hb)
  check_values_grads_jit_vmap(fn, ref, (q, ctx, g, *ks, hk, hb),
                              batched=tuple(range(7)), atol=5e-5)
  check_bf16(lambda q, ctx, g: fn(q, ctx, g, *[k.astype(q.dtype) for k in ks],
                                  hk, hb),
             lambda q, ctx, g: ref(q, ctx, g, *ks, hk, hb), (q, ctx, g),
             atol=1.5e-1)


def test_errors():
  q, ctx, g, ks, hk, hb = _args()
  with pytest.raises(ValueError, match="gates.*\\(2, 6, 7, 3\\)"):
    sp.focal_modulation(q, ctx, g[..., :2], ks, hk, hb)
  with pytest.raises(ValueError, match="focal_kernels\\[1\\]"):
    sp.focal_modulation(q, ctx, g, (ks[0], ks[1][:4, :4]), hk, hb)
  with pytest.raises(ValueError, match="h_kernel"):
    sp.focal_modulation(q, ctx, g, ks, hk[:2], hb)
  with pytest.raises(ValueError, match="`q` and `ctx`"):
    sp.focal_modulation(q, ctx[:, :3], g, ks, hk, hb)


def test_layer():
  layer = sp.FocalModulation(8, rngs=nnx.Rngs(0))
  assert layer.kernel_sizes == (3, 5)
  n = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
  assert n == 8 * 19 + 19 + 9 * 8 + 25 * 8 + 2 * (64 + 8)    # FocalNet's
  x = normal(5, (1, 5, 6, 8))
  z = np.asarray(layer.f(x))
  want = _focal64(z[..., :8], z[..., 8:16], z[..., 16:], layer.focal_kernels(),
                  layer.h.kernel[...], layer.h.bias[...], False)
  np.testing.assert_allclose(layer(x), layer.proj(jnp.asarray(want, jnp.float32)),
                             atol=1e-5)
