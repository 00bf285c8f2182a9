"""linear_attention, non-causal: the custom VJP of the group scan (issue 22
item 2: fwd+bwd about 3 forwards). Values and gradients against the
explicit [T, S] weights form (phi(q_i).phi(k_j), written out here and
differentiated by autodiff: a different computation from the library's
associative one), in float32 and bfloat16, under jit and vmap, with every
option the non-causal path has; masked key slots never reach the output or
a gradient; and the backward keeps no per-group intermediates (compiled temp
memory), which the autodiff backward did.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.sequence import linear, linear_attention
from tests.test_linear_attention_scan import _inputs

PHI = {
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def _explicit(q, k, v, *, phi, normalize=True, scale=None, kv_valid=None):
  """out_i = sum_j w_ij v_j / sum_j w_ij, w_ij = phi(q_i).phi(k_j) over the
  valid keys (or scale * sum_j w_ij v_j): the [T, S] weights written out."""
  n, kh = q.shape[2], k.shape[2]
  f32 = lambda x: x.astype(jnp.float32)
  fq = phi(f32(q))
  fk = jnp.repeat(phi(f32(k)), n // kh, axis=2)
  vv = jnp.repeat(f32(v), n // kh, axis=2)
  w = jnp.einsum("btnf,bsnf->bnts", fq, fk)
  if kv_valid is not None:
    w = jnp.where(kv_valid[:, None, None, :], w, 0.0)
    vv = jnp.where(kv_valid[:, :, None, None], vv, 0.0)
  num = jnp.einsum("bnts,bsnd->btnd", w, vv)
  if not normalize:
    return (num * (1.0 if scale is None else scale)).astype(q.dtype)
  den = jnp.sum(w, -1).transpose(0, 2, 1)[..., None]
  safe = jnp.where(den == 0, 1.0, den)
  return jnp.where(den == 0, 0.0, num / safe).astype(q.dtype)


@functools.partial(jax.jit, static_argnums=0)
def _vg(fn, q, k, v, w):
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(w.astype(out.dtype))


def _close(got, want, rtol, atol_rel, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(float(np.max(np.abs(want))), 1e-6)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_rel * scale,
                             err_msg=what)


# Lengths over _TOKENS_PER_STEP (512): several groups, ragged padded tails.
# (identity features only unnormalized: their denominator can cross 0.)
@pytest.mark.parametrize("feature_map,normalize", [
    ("elu_plus_one", True), ("relu", True), ("elu_plus_one", False),
    ("relu", False), ("identity", False)])
def test_values_and_grads_f32(feature_map, normalize):
  t, s = 700, 1300
  assert s > 2 * linear._TOKENS_PER_STEP
  q, k, v, w = _inputs(2, t, s, 4, 2, 8, 6, jnp.float32)
  valid = jnp.asarray(np.arange(s)[None] < np.array([[s - 37], [s - 600]]))
  mask = valid[:, None, None, :]
  kw = dict(feature_map=feature_map, normalize=normalize, scale=0.25)
  fn = functools.partial(linear_attention, mask=mask, **kw)
  ref = functools.partial(_explicit, phi=PHI[feature_map], kv_valid=valid,
                          normalize=normalize, scale=0.25)
  out, grads = _vg(fn, q, k, v, w)
  want, want_grads = _vg(ref, q, k, v, w)
  _close(out, want, 1e-4, 1e-5, "out")
  for name, a, b in zip("qkv", grads, want_grads):
    _close(a, b, 1e-3, 1e-4, name)


def test_callable_feature_map_and_bf16_under_vmap():
  phi = lambda x: jnp.concatenate([jax.nn.softplus(x), jnp.exp(-x * x)], -1)
  q, k, v, w = _inputs(3, 600, 1100, 2, 1, 8, 8, jnp.bfloat16, seed=1)
  fn = functools.partial(linear_attention, feature_map=phi)
  ref = functools.partial(_explicit, phi=phi)
  one = lambda f: jax.vmap(lambda a, b, c, d: _vg(f, a[None], b[None],
                                                  c[None], d[None]))
  out, grads = jax.jit(one(fn))(q, k, v, w)
  f32 = lambda x: x.astype(jnp.float32)
  want, want_grads = jax.jit(one(ref))(f32(q), f32(k), f32(v), w)
  assert out.dtype == jnp.bfloat16
  _close(out, want, 3e-2, 2e-2, "out")
  for name, a, b in zip("qkv", grads, want_grads):
    assert a.dtype == jnp.bfloat16
    _close(a, b, 5e-2, 3e-2, name)


def test_masked_key_slots_never_reach_output_or_gradients():
  q, k, v, w = _inputs(1, 520, 1040, 2, 2, 8, 8, jnp.float32, seed=2)
  valid = jnp.asarray(np.arange(1040) % 3 != 0)[None]
  poison = lambda x: jnp.where(valid[:, :, None, None], x, jnp.nan)
  fn = functools.partial(linear_attention, mask=valid[:, None, None, :])
  out, (dq, dk, dv) = _vg(fn, q, poison(k), poison(v), w)
  want, (wq, wk, wv) = _vg(fn, q, k, v, w)
  for a in (out, dq):
    assert np.all(np.isfinite(a))
  np.testing.assert_array_equal(out, want)
  np.testing.assert_array_equal(dq, wq)
  sel = np.asarray(valid[0])
  np.testing.assert_array_equal(np.asarray(dk)[:, sel], np.asarray(wk)[:, sel])
  np.testing.assert_array_equal(np.asarray(dv)[:, sel], np.asarray(wv)[:, sel])
  assert np.all(np.asarray(wk)[:, ~sel] == 0) and np.all(np.asarray(wv)[:, ~sel] == 0)


def test_no_visible_key_gives_zero_output_and_finite_zero_grads():
  q, k, v, w = _inputs(1, 600, 600, 2, 2, 8, 8, jnp.float32, seed=3)
  mask = jnp.zeros((1, 1, 1, 600), bool)
  out, grads = _vg(functools.partial(linear_attention, mask=mask), q, k, v, w)
  assert np.all(np.asarray(out) == 0)
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_backward_keeps_no_per_group_intermediates():
  """Compiled temp memory of fwd+bwd at S=16384 (B=1, 4 heads, 64): the
  custom VJP keeps one numerator|denominator array [S, N, Hv+1] (16.25 MiB)
  and per-group work; the autodiff backward stacked each group's features
  and products (127.5 MiB, ~7.8 such arrays)."""
  s, n, h = 16384, 4, 64
  q = k = v = w = jnp.ones((1, s, n, h), jnp.float32)
  fb = jax.jit(lambda q, k, v: jax.vjp(linear_attention, q, k, v)[1](w))
  temp = fb.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  nd_bytes = s * n * (h + 1) * 4
  assert temp <= 2 * nd_bytes, (temp / 2**20, nd_bytes / 2**20)


@pytest.mark.parametrize("decay", [False, True])
def test_causal_backward_rematerializes_each_group(decay):
  """Causal (and decayed causal): the reverse loop keeps each group's
  entering state and recomputes the group (jax.checkpoint'd scan step).
  Compiled fwd+bwd temp at S=16384 (B=1, 4 heads, 64): 9-10 MiB; reading
  back autodiff's stacked per-group intermediates took 164 MiB (195 MiB
  decayed). The bound, 2 arrays of [S, N, Hv+1] float32 (32.5 MiB), is
  what a linear-memory backward may use besides its inputs and outputs."""
  s, n, h = 16384, 4, 64
  q = k = v = w = jnp.ones((1, s, n, h), jnp.float32)
  kw = dict(is_causal=True)
  if decay:
    kw["decay"] = jnp.linspace(0.9, 0.99, n)
  f = functools.partial(linear_attention, **kw)
  fb = jax.jit(lambda q, k, v: jax.vjp(f, q, k, v)[1](w))
  temp = fb.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
  assert temp <= 2 * s * n * (h + 1) * 4, temp / 2**20
