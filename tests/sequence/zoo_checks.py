"""The shared treatment for the sequence-zoo mechanisms (issue 20), used by
tests/sequence/test_*.py: values against a float64 NumPy reference, float32
gradients against the plain-jnp reference, bfloat16, jit, vmap, fully masked
rows -> zeros, masked-slot invariance (the check of
tests/test_sequence_masked_slots.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tests.test_sequence_masked_slots import POISONS, _check_invariant


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


def check_poisoned_slots_unchanged(value_and_grad, args, keep, *,
                                   zero_grad_argnum):
  """For primitives with more than three arguments (key at args[1], value at
  args[2]): `value_and_grad(*args) -> (value, grads)`, jitted by the caller,
  gives bit-identical value and gradients when the masked key/value slots
  (`keep` [B, S] False) hold NaN, +Inf or -Inf, and the gradient w.r.t.
  args[zero_grad_argnum] (the key or the value) is zero at those slots.
  Returns the clean (value, grads)."""
  val, grads = value_and_grad(*args)
  at = ~np.asarray(keep)
  for poison in (np.nan, np.inf, -np.inf):
    bad = list(args)
    for i in (1, 2):
      bad[i] = jnp.where(keep[:, :, None, None], args[i], poison)
    val2, grads2 = value_and_grad(*bad)
    np.testing.assert_array_equal(val2, val, err_msg=f"poison {poison}")
    for a, b in zip(grads2, grads):
      np.testing.assert_array_equal(a, b, err_msg=f"poison {poison}")
    assert not np.any(np.asarray(grads2[zero_grad_argnum])[at]), poison
  return val, grads


def check_grads_bf16_vmap_masks(fn, ref, q, k, v, *, lengths=(7, 0),
                                rtol=1e-4, atol=1e-5, bf16_tol=4e-2, **kw):
  """The shared treatment after the value check, in three compiled functions
  (it used to take ten; each compile of a zoo mechanism costs seconds):

  * `fn` under jit(vmap(vjp)) -- vmapped over the batch split into examples
    of one -- with a key-padding mask of `lengths` valid keys per batch row
    (one row fully masked): outputs and gradients vs jit(vjp) of `ref`;
    the fully masked row -> zeros; everything finite;
  * the same compiled function with NaN / +-Inf in the masked key/value slots
    of the partly masked row: outputs and gradients unchanged, the gradient
    at a masked slot exactly zero (tests/test_sequence_masked_slots.py);
  * `fn` in bfloat16 under jit (output and gradient, same mask) vs `ref` on
    the bf16-rounded inputs in float32 (the compiled `ref` above).

  The unmasked float32 path is checked by each file's `check_values`."""
  b, s = q.shape[0], k.shape[1]
  assert len(lengths) == b and 0 in lengths and any(0 < n < s for n in lengths)
  keep = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]      # [B, S]
  mask = keep[:, None, None, :]
  cot = jnp.asarray(np.random.default_rng(2).normal(
      size=q.shape[:-1] + v.shape[-1:]), jnp.float32)

  def vjp(f, dtype):
    def run(q, k, v, mask, cot):
      out, back = jax.vjp(lambda q, k, v: f(q, k, v, mask=mask, **kw), q, k, v)
      return (out,) + back(cot.astype(dtype))
    return run

  # jit + vmap + grads: one compile; examples of one batch row each.
  split = lambda x: x[:, None]
  run = jax.jit(jax.vmap(vjp(fn, q.dtype)))
  got = lambda q, k, v: [x[:, 0] for x in run(*map(split, (q, k, v, mask,
                                                           cot)))]
  run_ref = jax.jit(vjp(ref, jnp.float32))
  base, want = got(q, k, v), run_ref(q, k, v, mask, cot)
  names = ("out", "dq", "dk", "dv")
  for name, a, w in zip(names, base, want):
    assert a.shape == w.shape and a.dtype == q.dtype, (name, a.shape, a.dtype)
    assert bool(jnp.all(jnp.isfinite(a))), name
    np.testing.assert_allclose(a, w, rtol=rtol, atol=atol, err_msg=name)
  for i, n in enumerate(lengths):
    if n == 0:
      np.testing.assert_array_equal(np.asarray(base[0][i]), 0.0)

  # Masked slots of the partly masked rows hold NaN / +-Inf.
  kp = np.asarray(keep)
  poison_at = ~kp & (kp.sum(1) > 0)[:, None]
  for value, which in POISONS:
    at = jnp.asarray(poison_at)[:, :, None, None]
    kk = jnp.where(at, jnp.asarray(value, k.dtype), k) if "k" in which else k
    vv = jnp.where(at, jnp.asarray(value, v.dtype), v) if "v" in which else v
    msg = f"poison {value} in {which}"
    out, dq, dk, dv = (np.asarray(x) for x in got(q, kk, vv))
    np.testing.assert_allclose(out, base[0], rtol=1e-5, atol=1e-6,
                               err_msg=msg)
    np.testing.assert_allclose(dq, base[1], rtol=1e-4, atol=1e-5, err_msg=msg)
    for g_bad, g_clean in ((dk, base[2]), (dv, base[3])):
      np.testing.assert_allclose(g_bad[kp], np.asarray(g_clean)[kp],
                                 rtol=1e-4, atol=1e-5, err_msg=msg)
      assert np.all(g_bad[~kp] == 0.0), f"gradient at a masked slot: {msg}"

  # bfloat16 under jit, output and gradients.
  bf = lambda x: x.astype(jnp.bfloat16)
  f32 = lambda x: x.astype(jnp.float32)
  outs = jax.jit(vjp(fn, jnp.bfloat16))(bf(q), bf(k), bf(v), mask, cot)
  want = run_ref(f32(bf(q)), f32(bf(k)), f32(bf(v)), mask, cot)
  assert all(x.dtype == jnp.bfloat16 for x in outs)
  assert all(bool(jnp.all(jnp.isfinite(f32(x)))) for x in outs)
  np.testing.assert_allclose(f32(outs[0]), want[0], atol=bf16_tol,
                             rtol=bf16_tol)
