"""Rows whose logits all lie below -1e30 through a finite bias (issue 15).

A finite bias is not a mask: a row whose bias is -1e38 everywhere is still
the softmax of its logits. In float32, q.k * scale (|.| ~ 1) is absorbed by
-1e38 (ulp ~ 1e31), so the row's logits are exactly the bias: a constant
row gives uniform weights (output = mean of v), and a row whose bias rises
from -3e38 to -1e31 puts all its weight on the last key (the gaps are
~1e37). That is what `jax.nn.softmax` gives; the reference below is those
closed-form weights, and float64 NumPy for values and gradients.

Three bugs made these rows wrong before (all fixed, the tests fail on the
old code): the Pallas kernel's running max started at the old sentinel
MASK_VALUE = -1e30, so rows below it came out zero; with a mask active
every backend filled masked logits with -1e30, which beat the real logits
in the row max (masked slots got the weight, zero rows came out); and the
'chunked' and 'pallas' backwards recomputed p = exp(s - lse) from
lse = m + log(l) in float32, where log(l) is lost when |m| ~ 1e38 (p came
out S times too large). Now MASK_VALUE is the lowest finite float32
(pallas_kernels/_rules.py), empty rows are recognised by l == 0, and the
backwards keep (m, log l) apart.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax

B, T, S, N, H = 1, 4, 8, 1, 8
SCALE = 1.0 / np.sqrt(H)
IMPLEMENTATIONS = ["xla", "chunked", "pallas"]


def _inputs():
  kq, kk, kv, kw = jax.random.split(jax.random.key(0), 4)
  q, k, v, w = (jax.random.normal(x, (B, n, N, H), jnp.float32)
                for x, n in ((kq, T), (kk, S), (kv, S), (kw, T)))
  bias = np.zeros((B, N, T, S), np.float32)
  bias[:, :, 1, :] = -1e38                       # constant, far below -1e30
  bias[:, :, 2, :] = -2e30                       # constant, just below -1e30
  bias[:, :, 3, :] = np.linspace(-3e38, -1e31, S)  # rising: last key wins
  return q, k, v, w, jnp.asarray(bias)


def _reference(q, k, v, w, valid=np.ones(S, bool)):
  """float64 weights over the `valid` keys (row 0: softmax of q.k * scale;
  rows 1-3: the closed forms above), output and the gradients of
  sum(out * w)."""
  q, k, v, w = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v, w))
  s0 = np.where(valid, q[0] @ k.T * SCALE, -np.inf)
  p = np.zeros((T, S))
  p[0] = np.exp(s0 - s0.max()) / np.exp(s0 - s0.max()).sum()
  p[1] = p[2] = valid / valid.sum()
  p[3, -1] = 1.0
  o = p @ v
  delta = (w * o).sum(-1, keepdims=True)
  ds = p * (w @ v.T - delta)
  grads = (ds @ k * SCALE, ds.T @ q * SCALE, p.T @ w)
  return o, grads


def _call(implementation):
  q, k, v, w, bias = _inputs()

  def f(q, k, v):
    return attnjax.dot_product_attention(q, k, v, bias=bias,
                                         implementation=implementation)
  return f, (q, k, v), w


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_rows_below_mask_sentinel_are_softmax_of_their_logits(implementation):
  f, (q, k, v), w = _call(implementation)
  o_ref, _ = _reference(q, k, v, w)
  out = np.asarray(f(q, k, v), np.float64)[0, :, 0]
  np.testing.assert_allclose(out, o_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_rows_below_mask_sentinel(implementation):
  q, k, v, w, bias = _inputs()
  valid = np.arange(S) > 0                        # key 0 masked
  mask = jnp.asarray(valid)[None, None, None, :]
  out = attnjax.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      implementation=implementation)
  o_ref, _ = _reference(q, k, v, w, valid)
  np.testing.assert_allclose(np.asarray(out, np.float64)[0, :, 0], o_ref,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_of_rows_below_mask_sentinel(implementation):
  f, (q, k, v), w = _call(implementation)
  _, g_ref = _reference(q, k, v, w)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w),
                   argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, g_ref):
    np.testing.assert_allclose(np.asarray(g, np.float64)[0, :, 0], r,
                               atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_gradients_lse_and_dead_slots_below_mask_sentinel(
    implementation):
  """With a mask: key 0 masked for every query and holding NaN/Inf (it
  must reach nothing), row 2 fully masked (zeros, zero gradients, lse
  -inf); the other rows are their closed forms, and so is the lse
  (m + log(#valid), which rounds to m at 1e38)."""
  q, k, v, w, bias = _inputs()
  valid = np.arange(S) > 0
  rows = np.ones((T, 1), bool)
  rows[2] = False
  mask = jnp.asarray(valid[None, :] & rows)[None, None]
  k = k.at[:, 0].set(jnp.nan)
  v = v.at[:, 0].set(jnp.inf)

  def f(q, k, v):
    return attnjax.dot_product_attention_with_lse(
        q, k, v, bias=bias, mask=mask, implementation=implementation)

  o_ref, g_ref = _reference(q, k.at[:, 0].set(0.0), v.at[:, 0].set(0.0), w,
                            valid)
  o_ref[2] = 0.0
  (out, lse) = f(q, k, v)
  np.testing.assert_allclose(np.asarray(out, np.float64)[0, :, 0], o_ref,
                             atol=1e-5, rtol=1e-5)
  lse = np.asarray(lse)[0, 0]
  s0 = np.asarray(q, np.float64)[0, 0, 0] @ np.asarray(k, np.float64)[
      0, 1:, 0].T * SCALE
  lse_ref = [np.log(np.exp(s0 - s0.max()).sum()) + s0.max(), -1e38, -np.inf,
             -1e31]
  np.testing.assert_allclose(lse, np.asarray(lse_ref, np.float32), rtol=1e-5)
  # Row 2 carries no cotangent in the reference (its weights are zero), so
  # the reference gradients only need row 2 of dq zeroed.
  w2 = w.at[:, 2].set(0.0)
  _, g_ref = _reference(q, k.at[:, 0].set(0.0), v.at[:, 0].set(0.0), w2,
                        valid)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0] * w),
                   argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, g_ref):
    g = np.asarray(g, np.float64)[0, :, 0]
    assert np.all(np.isfinite(g)), f"d{name} not finite"
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_row_at_lowest_float32_is_not_taken_for_an_empty_row(implementation):
  """A row whose logits all equal the lowest finite float32 (= MASK_VALUE)
  is uniform, with lse = that value (not -inf) and the gradients of uniform
  weights: emptiness is decided by the normalizer, not by the value."""
  q, k, v, w, _ = _inputs()
  low = np.finfo(np.float32).min
  bias = np.zeros((B, N, T, S), np.float32)
  bias[:, :, 1:, :] = low
  mask = jnp.ones((1, 1, 1, S), bool).at[..., 0].set(False)
  valid = np.arange(S) > 0

  def f(q, k, v):
    return attnjax.dot_product_attention_with_lse(
        q, k, v, bias=jnp.asarray(bias), mask=mask,
        implementation=implementation)

  out, lse = f(q, k, v)
  qf, kf, vf, wf = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v, w))
  s0 = np.where(valid, qf[0] @ kf.T * SCALE, -np.inf)
  p = np.tile(valid / valid.sum(), (T, 1))
  p[0] = np.exp(s0 - s0.max()) / np.exp(s0 - s0.max()).sum()
  np.testing.assert_allclose(np.asarray(out, np.float64)[0, :, 0], p @ vf,
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(lse)[0, 0, 1:], low)
  ds = p * (wf @ vf.T - (wf * (p @ vf)).sum(-1, keepdims=True))
  g_ref = (ds @ kf * SCALE, ds.T @ qf * SCALE, p.T @ wf)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)[0] * w),
                   argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, g_ref):
    np.testing.assert_allclose(np.asarray(g, np.float64)[0, :, 0], r,
                               atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masked_rows_below_mask_sentinel_under_strict_modes(implementation):
  """The lowest-float32 masked fill forms no inf (jax.debug_infs), and the
  masked path stays rank/dtype-promotion clean: values and gradients of
  the masked case under the three strict modes at once."""
  from tests.strict_modes import strict_mode
  q, k, v, w, bias = _inputs()
  valid = np.arange(S) > 0
  mask = jnp.asarray(valid)[None, None, None, :]

  def loss(q, k, v):
    out = attnjax.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                        implementation=implementation)
    return jnp.sum(out * w)

  with strict_mode("all"):
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  _, g_ref = _reference(q, k, v, w, valid)
  for name, g, r in zip("qkv", grads, g_ref):
    np.testing.assert_allclose(np.asarray(g, np.float64)[0, :, 0], r,
                               atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
