"""The shared treatment for the sequence-zoo mechanisms (issue 20), used by
tests/sequence/test_*.py: values against a float64 NumPy reference, float32
gradients against the plain-jnp reference, bfloat16, jit, vmap, fully masked
rows -> zeros, masked-slot invariance (the check of
tests/test_sequence_masked_slots.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.test_sequence_masked_slots import _check_invariant


def inputs(seed=0, b=2, t=12, s=None, n=4, k=2, h=8, hv=6, dtype=jnp.float32):
  s = t if s is None else s
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in
               ((b, t, n, h), (b, s, k, h), (b, s, k, hv)))


def check_values(fn, ref64, q, k, v, *, rtol=1e-5, atol=1e-5, **kw):
  """jit(fn) in float32 against the float64 NumPy reference."""
  got = jax.jit(functools.partial(fn, **kw))(q, k, v)
  want = ref64(*(np.asarray(x, np.float64) for x in (q, k, v)), **kw)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert got.dtype == q.dtype
  np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)
  return got


def check_grads(fn, ref, q, k, v, *, rtol=1e-4, atol=1e-5, **kw):
  w = jnp.asarray(np.random.default_rng(2).normal(
      size=q.shape[:-1] + v.shape[-1:]), jnp.float32)

  def loss(f, q, k, v):
    return jnp.sum(f(q, k, v, **kw) * w)

  g1 = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(
      q, k, v)
  for a, b in zip(g1, g2):
    assert bool(jnp.all(jnp.isfinite(a)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def check_bf16(fn, ref, q, k, v, *, tol=4e-2, **kw):
  bf = lambda x: x.astype(jnp.bfloat16)
  got = jax.jit(functools.partial(fn, **kw))(bf(q), bf(k), bf(v))
  assert got.dtype == jnp.bfloat16
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(functools.partial(ref, **kw))(f32(bf(q)), f32(bf(k)),
                                               f32(bf(v)))
  np.testing.assert_allclose(f32(got), want, atol=tol, rtol=tol)
  g = jax.jit(jax.grad(lambda q: jnp.sum(
      fn(q, bf(k), bf(v), **kw).astype(jnp.float32))))(bf(q))
  assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(f32(g))))


def check_vmap(fn, q, k, v, **kw):
  f = functools.partial(fn, **kw)
  np.testing.assert_allclose(jax.jit(jax.vmap(f))(q, k, v),
                             jax.jit(f)(q, k, v), rtol=1e-5, atol=1e-5)


def check_masked_rows(fn, ref, q, k, v, lengths=(7, 0), **kw):
  """Key-padding mask vs the reference; batch rows with no key -> zeros."""
  s = k.shape[1]
  valid = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
  mask = valid[:, None, None, :]
  got = jax.jit(functools.partial(fn, mask=mask, **kw))(q, k, v)
  want = jax.jit(functools.partial(ref, mask=mask, **kw))(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for i, n in enumerate(lengths):
    if n == 0:
      np.testing.assert_array_equal(np.asarray(got[i]), 0.0)
  assert not np.any(np.isnan(np.asarray(got)))


def check_masked_slots(fn, *, t=12, s=None, seed=0, **kw):
  """NaN/Inf in masked key/value slots reach neither output nor gradients."""
  s = t if s is None else s
  q, k, v = inputs(seed, t=t, s=s, n=2, k=2, h=8, hv=8)
  keep = jnp.asarray(np.arange(s)[None, :] < np.array([s - 3, 5])[:, None])
  _check_invariant(functools.partial(fn, **kw), q, k, v, keep)


def check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw):
  """The shared treatment after the value check: gradients vs `ref`, bf16,
  vmap, fully masked rows -> zeros, masked-slot invariance."""
  check_grads(fn, ref, q, k, v, **kw)
  check_bf16(fn, ref, q, k, v, **kw)
  check_vmap(fn, q, k, v, **kw)
  check_masked_rows(fn, ref, q, k, v, **kw)
  check_masked_slots(fn, **kw)
