"""Rows whose logits all lie below -1e30 through a finite bias (issue 15).

A finite bias is not a mask: a row whose bias is -1e38 everywhere is still
the softmax of its logits. In float32, q.k * scale (|.| ~ 1) is absorbed by
-1e38 (ulp ~ 1e31), so the row's logits are exactly the bias: a constant
row gives uniform weights (output = mean of v), and a row whose bias rises
from -3e38 to -1e31 puts all its weight on the last key (the gaps are
~1e37). That is what `jax.nn.softmax` gives; the reference below is those
closed-form weights, and float64 NumPy for values and gradients.

The Pallas flash kernel (interpret mode here) returns zero rows instead: its
running max starts at, and masked logits are set to, the sentinel
MASK_VALUE = -1e30 (pallas_kernels/_rules.py), so every logit below it
gives exp(s - m) = exp(-1e38 + 1e30) = 0, l = 0 and the row is treated as
empty. With a mask active every backend ('xla' included) fills masked
logits with the same -1e30, which then beats the real logits (-1e38) in the
row max: rows come out zero. Setting MASK_VALUE to the lowest finite
float32 (as attnjax._numerics.NEG already is) fixes all forwards (checked
on a copy). 'chunked' gets the forward right but its backward recomputes
p = exp(s - lse) from lse = m + log(l) stored in float32: at |m| ~ 1e38 the
log(l) is lost to rounding and p is S times too large (the Pallas backward
reads the lse the same way). Fixes proposed in the issue-15 report
(flash.py is D1's file, chunked.py D2's): xfail(strict=True).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax

B, T, S, N, H = 1, 4, 8, 1, 8
SCALE = 1.0 / np.sqrt(H)


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


_PALLAS_WHY = ("flash kernel: running max starts at (and masked logits are "
               "set to) the -1e30 sentinel, so rows below it come out zero "
               "(issue 15; fix belongs in D1's pallas_kernels/flash.py)")
_LSE_WHY = ("backward recomputes p = exp(s - lse) with lse = m + log(l) "
            "rounded in float32: at |m| ~ 1e38 log(l) is lost, p comes out "
            "S times too large (issue 15; fix: keep m and l as residuals)")


def _call(implementation):
  q, k, v, w, bias = _inputs()

  def f(q, k, v):
    return attnjax.dot_product_attention(q, k, v, bias=bias,
                                         implementation=implementation)
  return f, (q, k, v), w


@pytest.mark.parametrize("implementation", [
    "xla", "chunked",
    pytest.param("pallas", marks=pytest.mark.xfail(strict=True,
                                                   reason=_PALLAS_WHY))])
def test_rows_below_mask_sentinel_are_softmax_of_their_logits(implementation):
  f, (q, k, v), w = _call(implementation)
  o_ref, _ = _reference(q, k, v, w)
  out = np.asarray(f(q, k, v), np.float64)[0, :, 0]
  np.testing.assert_allclose(out, o_ref, atol=1e-5, rtol=1e-5)


_MASK_WHY = ("masked logits are set to MASK_VALUE = -1e30, above the real "
             "logits (-1e38), so the row max is the sentinel and the row "
             "comes out zero (issue 15; fix: MASK_VALUE = lowest finite "
             "float32 in D1's pallas_kernels/_rules.py)")


@pytest.mark.parametrize("implementation", ["xla", "chunked", "pallas"])
@pytest.mark.xfail(strict=True, reason=_MASK_WHY)
def test_masked_rows_below_mask_sentinel(implementation):
  q, k, v, w, bias = _inputs()
  valid = np.arange(S) > 0                        # key 0 masked
  mask = jnp.asarray(valid)[None, None, None, :]
  out = attnjax.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                      implementation=implementation)
  o_ref, _ = _reference(q, k, v, w, valid)
  np.testing.assert_allclose(np.asarray(out, np.float64)[0, :, 0], o_ref,
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [
    "xla",
    pytest.param("chunked", marks=pytest.mark.xfail(strict=True,
                                                    reason=_LSE_WHY)),
    pytest.param("pallas", marks=pytest.mark.xfail(
        strict=True, reason=_PALLAS_WHY + "; " + _LSE_WHY))])
def test_gradients_of_rows_below_mask_sentinel(implementation):
  f, (q, k, v), w = _call(implementation)
  _, g_ref = _reference(q, k, v, w)
  grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w),
                   argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", grads, g_ref):
    np.testing.assert_allclose(np.asarray(g, np.float64)[0, :, 0], r,
                               atol=1e-5, rtol=1e-5, err_msg=f"d{name}")
