"""SANet strip attention: float64 definition, reference, jit/vmap/grad,
bf16, errors, layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import spatial as sp
from tests.spatial.zoo_checks import (check_bf16, check_values_grads_jit_vmap,
                                      normal)


def _strip64(x, w, axis):
  """np.pad(mode='reflect') + explicit taps, float64."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  b, h, wd, c = x.shape
  g, k = w.shape[1:]
  r = k // 2
  ax = 1 if axis == "h" else 2
  pads = [(0, 0)] * 4
  pads[ax] = (r, r)
  xp = np.pad(x, pads, mode="reflect")
  out = np.zeros_like(x)
  for bi in range(b):
    for ch in range(c):
      for t in range(k):
        sl = xp[bi, t:t + h, :, ch] if axis == "h" else xp[bi, :, t:t + wd, ch]
        out[bi, :, :, ch] += w[bi, ch // (c // g), t] * sl
  return out


@pytest.mark.parametrize("axis", ["w", "h"])
def test_matches_float64_definition(axis):
  x, w = normal(0, (2, 6, 7, 4)), jax.nn.sigmoid(normal(1, (2, 2, 5)))
  want = _strip64(x, w, axis)
  for f in (sp.strip_attention, sp.strip_attention_reference):
    np.testing.assert_allclose(f(x, w, axis=axis), want, atol=1e-5, rtol=1e-5)


def test_values_grads_jit_vmap_bf16():
  x, w = normal(0, (2, 6, 7, 4)), normal(1, (2, 4, 3))
  fn = lambda x, w: sp.strip_attention(x, w, axis="h")
  ref = lambda x, w: sp.strip_attention_reference(x, w, axis="h")
  check_values_grads_jit_vmap(fn, ref, (x, w), batched=(0, 1))
  check_bf16(lambda x: fn(x, w.astype(x.dtype)), lambda x: ref(x, w), (x,),
             batched=(0,))


def test_errors():
  x = normal(0, (2, 6, 7, 4))
  with pytest.raises(ValueError, match="axis"):
    sp.strip_attention(x, jnp.ones((2, 2, 3)), axis="d")
  with pytest.raises(ValueError, match="groups=3"):
    sp.strip_attention(x, jnp.ones((2, 3, 3)))
  with pytest.raises(ValueError, match="K // 2"):
    sp.strip_attention(x, jnp.ones((2, 2, 13)), axis="h")
  with pytest.raises(ValueError, match="`x`"):
    sp.strip_attention(x[0], jnp.ones((2, 2, 3)))


def test_layers():
  layer = sp.CubicAttention(4, kernel=3, rngs=nnx.Rngs(0))
  x = normal(2, (1, 5, 6, 4))
  np.testing.assert_allclose(layer(x), x, atol=1e-6)        # gamma = 0 init
  layer.gamma[...] = jnp.full((4,), 2.0)
  hs = layer.H_spatial_att
  w1 = jax.nn.sigmoid(np.asarray(x).mean((1, 2)) @ np.asarray(hs.conv.kernel[...]))
  y = _strip64(x, w1.reshape(1, 1, 3), "w")
  vs = layer.W_spatial_att
  w2 = jax.nn.sigmoid(y.mean((1, 2)) @ np.asarray(vs.conv.kernel[...], np.float64))
  z = _strip64(y, np.asarray(w2).reshape(1, 1, 3), "h")
  np.testing.assert_allclose(layer(x), 2 * z + np.asarray(x), atol=1e-5)
