"""linear_attention over several loop steps (sequences longer than one
group of `_TOKENS_PER_STEP` positions): values and gradients vs the
cumulative-sum reference (f32 and bf16, causal and not, GQA, cross lengths,
key padding), and the structure that keeps the backward pass linear in
length: no loop of the forward or backward computation carries a full-length
array (issue 22: the old loops carried the whole output, so every reverse
step copied it and fwd+bwd grew ~S^1.35).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.sequence import linear, linear_attention, linear_attention_reference


def _inputs(b, t, s, n, kh, h, hv, dtype, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), dtype)
  v = jax.random.normal(ks[2], (b, s, kh, hv), dtype)
  w = jax.random.normal(ks[3], (b, t, n, hv), jnp.float32)
  return q, k, v, w


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, w):
  """fn(q, k, v) and the gradients of sum(fn(q, k, v) * w), in one compiled
  program (eager autodiff compiled every op of the loops on its own)."""
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(w.astype(out.dtype))


# Lengths above 512 = _TOKENS_PER_STEP: several loop steps, padded tails.
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(1100, 1100), (700, 1300)])
def test_multi_step_values_and_grads_f32(causal, t, s):
  assert max(t, s) > 2 * linear._TOKENS_PER_STEP
  q, k, v, w = _inputs(1, t, s, 4, 2, 8, 6, jnp.float32)
  mask = jnp.asarray(np.arange(s) < s - 37)[None, None, None, :]
  fn = functools.partial(linear_attention, is_causal=causal, chunk_size=64,
                         mask=mask)
  ref = functools.partial(linear_attention_reference, is_causal=causal,
                          mask=mask)
  out, grads = _value_and_grads(fn, q, k, v, w)
  want, want_grads = _value_and_grads(ref, q, k, v, w)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
  for name, a, b in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3, err_msg=name)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_step_values_and_grads_bf16(causal):
  q, k, v, w = _inputs(1, 1100, 1100, 2, 2, 8, 8, jnp.bfloat16, seed=1)
  fn = functools.partial(linear_attention, is_causal=causal, chunk_size=64)
  out, grads = _value_and_grads(fn, q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  want, want_grads = _value_and_grads(
      functools.partial(linear_attention_reference, is_causal=causal),
      f32(q), f32(k), f32(v), w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(out), want, rtol=3e-2, atol=3e-2)
  for name, a, b in zip("qkv", grads, want_grads):
    assert a.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(f32(a), b, rtol=5e-2, atol=3e-2 * scale,
                               err_msg=name)


def _loop_carries(jaxpr):
  """Sizes of every value carried by a scan/while loop, recursively."""
  out = []
  for eqn in jaxpr.eqns:
    p = eqn.primitive.name
    if p == "scan":
      nc, ncar = _scan_counts(eqn.params)
      out += [int(np.prod(x.aval.shape)) for x in eqn.invars[nc:nc + ncar]]
    elif p == "while":
      body = eqn.params["body_jaxpr"].jaxpr
      nb = eqn.params["body_nconsts"]
      out += [int(np.prod(x.aval.shape)) for x in body.invars[nb:]]
    for sub in jax.core.jaxprs_in_params(eqn.params) if hasattr(
        jax.core, "jaxprs_in_params") else _subjaxprs(eqn.params):
      out += _loop_carries(sub)
  return out


def _scan_counts(params):
  """(number of consts, number of carried values) of a scan equation."""
  if "num_consts" in params:
    return params["num_consts"], params["num_carry"]
  # Newer jax: ft_in = (consts, carry, xs) flat trees; iterating one gives
  # its leaves.
  ft = params["ft_in"]
  if hasattr(ft, "elts"):
    consts, carry, _ = ft.elts
    return len(list(consts)), len(list(carry))
  consts, carry, _ = ft.tree.children()
  return consts.num_leaves, carry.num_leaves


def _subjaxprs(params):
  for v in params.values():
    vs = v if isinstance(v, (list, tuple)) else (v,)
    for x in vs:
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


@pytest.mark.parametrize("causal", [False, True])
def test_no_loop_carries_a_full_length_array(causal):
  b, t, n, h = 1, 4096, 2, 8
  q, k, v, _ = _inputs(b, t, t, n, n, h, h, jnp.float32)
  fn = functools.partial(linear_attention, is_causal=causal)
  loss = lambda q, k, v: jnp.sum(fn(q, k, v))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  carries = _loop_carries(jaxpr)
  assert carries, "expected the grouped loops in the jaxpr"
  # The state is [B, K, F, Hv + 1]; anything of order B * T * N * H elements
  # carried through a loop is copied/updated on every step.
  assert max(carries) < t, sorted(carries)[-5:]
