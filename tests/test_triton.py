"""Triton flash attention through jax-triton: GPU only, skips cleanly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from pallas_kernels import flash as fa
from pallas_kernels import triton_flash as tf
from tests.conftest import gpu_available


def test_guarded_import_and_refusal_everywhere():
  # Importing never fails; where Triton cannot run, calls refuse clearly.
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  if not tf.triton_available():
    assert tf.why_unavailable()
    with pytest.raises(NotImplementedError):
      tf.triton_flash_attention(q, q, q)
    with pytest.raises(NotImplementedError, match="triton"):
      attnjax.dot_product_attention(q, q, q, implementation="triton")
  # Calls the Triton backend never serves are refused on every platform.
  with pytest.raises(NotImplementedError):
    attnjax.dot_product_attention(q, q, q, bias=jnp.zeros((8, 8)),
                                  implementation="triton")


needs_triton = pytest.mark.skipif(
    not (gpu_available() and tf.triton_available()),
    reason="needs a GPU and jax_triton")


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_values_and_grads_vs_reference(dtype, is_causal):
  rng = np.random.default_rng(0)
  b, t, s, n, kh, h = 2, 200, 200 if is_causal else 333, 4, 2, 64
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  dout = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  kern = lambda q, k, v: tf.triton_flash_attention(q, k, v,
                                                   is_causal=is_causal)
  ref = lambda q, k, v: fa.mha_reference(q, k, v, is_causal=is_causal)
  f32 = lambda x: x.astype(jnp.float32)
  tol = 2e-3 if dtype == jnp.float32 else 3e-2   # TF32 dots on GPU
  np.testing.assert_allclose(np.asarray(jax.jit(kern)(q, k, v), np.float32),
                             ref(f32(q), f32(k), f32(v)), atol=tol, rtol=tol)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)
                                            * dout)
  g = jax.jit(jax.grad(loss(kern), (0, 1, 2)))(q, k, v)
  gr = jax.grad(loss(ref), (0, 1, 2))(f32(q), f32(k), f32(v))
  for a, r in zip(g, gr):
    err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(r)) / (
        np.linalg.norm(np.asarray(r)))
    assert err < 5e-2, err
