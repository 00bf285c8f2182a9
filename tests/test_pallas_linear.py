"""Causal chunked linear attention kernel (interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention as la


def _rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)


@pytest.mark.parametrize("dtype,normalize,chunk", [
    (jnp.float32, True, 8), (jnp.bfloat16, True, 16),
    (jnp.float32, False, 16)])
def test_values_and_grads_vs_reference(dtype, normalize, chunk):
  b, t, n, dk, dv = 2, 37, 2, 8, 16      # t not a multiple of the chunk
  q, k, v = (_rand(0, (b, t, n, dk), dtype), _rand(1, (b, t, n, dk), dtype),
             _rand(2, (b, t, n, dv), dtype))
  fm = "elu_plus_one" if normalize else "identity"
  kern = lambda q, k, v: la.causal_linear_attention(
      q, k, v, feature_map=fm, normalize=normalize, chunk_size=chunk)
  ref = lambda q, k, v: la.causal_linear_attention_reference(
      q, k, v, feature_map=fm, normalize=normalize)
  f32 = lambda x: x.astype(jnp.float32)
  out = jax.jit(kern)(q, k, v)
  r = ref(f32(q), f32(k), f32(v))
  assert out.dtype == dtype and out.shape == (b, t, n, dv)
  assert _rel(out, r) < (1e-5 if dtype == jnp.float32 else 2e-2)
  dout = _rand(3, (b, t, n, dv))
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)
                                            * dout)
  g = jax.jit(jax.grad(loss(kern), (0, 1, 2)))(q, k, v)
  gr = jax.grad(loss(ref), (0, 1, 2))(f32(q), f32(k), f32(v))
  for a, rg in zip(g, gr):
    assert a.dtype == dtype
    assert _rel(a, rg) < (1e-4 if dtype == jnp.float32 else 5e-2)


def test_causality_and_errors():
  q, k, v = _rand(4, (1, 24, 1, 8)), _rand(5, (1, 24, 1, 8)), _rand(
      6, (1, 24, 1, 8))
  out = la.causal_linear_attention(q, k, v, chunk_size=8)
  out2 = la.causal_linear_attention(q, k.at[:, 20:].set(9.0),
                                    v.at[:, 20:].set(9.0), chunk_size=8)
  np.testing.assert_allclose(out[:, :20], out2[:, :20], atol=1e-6)
  assert not np.allclose(out[:, 20:], out2[:, 20:])
  with pytest.raises(ValueError, match="key"):
    la.causal_linear_attention(q, k[:, :5], v)
  with pytest.raises(ValueError, match="feature_map"):
    la.causal_linear_attention(q, k, v, feature_map="nope")
  with pytest.raises(ValueError, match="chunk_size"):
    la.causal_linear_attention(q, k, v, chunk_size=0)


@pytest.mark.parametrize("fm", ["relu", "elu_plus_one"])
def test_one_reference_per_op(fm):
  """The kernel, its reference and attnjax's linear_attention_reference
  compute the same causal normalized attention (one normalisation rule:
  num / den, 0 where den == 0, no epsilon), including a row with no key
  mass (relu of an all-negative query: den == 0 -> zeros)."""
  from attnjax.sequence import linear_attention, linear_attention_reference
  q, k, v = _rand(7, (1, 19, 2, 8)), _rand(8, (1, 19, 2, 8)), _rand(
      9, (1, 19, 2, 8))
  # Small features (relu): the denominators are ~1e-3, so an epsilon of
  # 1e-6 (the kernel's old default) would show at the tolerance below.
  q, k = 0.03 * q, 0.03 * k
  q = q.at[:, 5].set(-jnp.abs(q[:, 5]) - 0.01)    # relu(q_5) == 0
  ref = linear_attention_reference(q, k, v, feature_map=fm, is_causal=True)
  kern_ref = la.causal_linear_attention_reference(q, k, v, feature_map=fm)
  kern = la.causal_linear_attention(q, k, v, feature_map=fm, chunk_size=8)
  via_op = linear_attention(q, k, v, feature_map=fm, is_causal=True,
                            chunk_size=8, implementation="pallas")
  for got in (kern_ref, kern, via_op):
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
  if fm == "relu":
    assert np.all(np.asarray(kern)[:, 5] == 0.0)
    assert np.all(np.asarray(ref)[:, 5] == 0.0)
    with_eps = la.causal_linear_attention_reference(q, k, v, feature_map=fm,
                                                    eps=1e-6)
    assert not np.allclose(with_eps, ref, rtol=2e-5, atol=2e-6)
