"""Based: 2nd-order Taylor linear attention + exact sliding window (summed),
against an explicit float64 NumPy loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc


def _ref64(q, k, v, *, window_size=3, is_causal=False, scale=None, mask=None,
           chunk_size=None):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  scale = 1 / np.sqrt(h) if scale is None else scale
  left, right = ((window_size, window_size) if np.isscalar(window_size)
                 else window_size)
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hd in range(n):
      kk, vv = k[bi, :, hd // g], v[bi, :, hd // g]
      for i in range(t):
        ok = keep[bi] & ((np.arange(s) <= i) if is_causal else True)
        x = kk @ q[bi, i, hd] / np.sqrt(h)
        w = np.where(ok, 1 + x + x * x / 2, 0.0)
        if w.sum() > 0:
          out[bi, i, hd] += w @ vv / w.sum()
        j = np.arange(s)
        win = ok & (j >= i - left) & (j <= i + (0 if is_causal else right))
        if win.any():
          z = np.where(win, kk @ q[bi, i, hd] * scale, -np.inf)
          p = np.exp(z - z.max())
          out[bi, i, hd] += p @ vv / p.sum()
  return out


def test_taylor_feature_map_is_second_order_exp():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(2, 5, 8)) * 0.3
  got = np.sum(np.asarray(sq.taylor_feature_map(jnp.asarray(x))) *
               np.asarray(sq.taylor_feature_map(jnp.asarray(y))), -1)
  s = np.sum(x * y, -1) / np.sqrt(8)
  np.testing.assert_allclose(got, 1 + s + s * s / 2, rtol=1e-5)
  assert got.shape == (5,) and sq.taylor_feature_map(jnp.ones(8)).shape == (73,)


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False),
                                          (False, True), (True, True)])
def test_four_patterns_match_float64(causal, cross):
  q, k, v = zc.inputs(0, t=10, s=7 if cross else 10)
  fn = functools.partial(sq.based_attention, chunk_size=4, block_size=4)
  zc.check_values(fn, _ref64, q, k, v, window_size=3, is_causal=causal)


def test_window_zero_is_taylor_only_and_tuple_window():
  q, k, v = zc.inputs(1, t=9)
  zc.check_values(sq.based_attention, _ref64, q, k, v, window_size=(2, 1))
  a = sq.based_attention(q, k, v, window_size=0, is_causal=True)
  b = sq.linear_attention(q, k, v, feature_map=sq.taylor_feature_map,
                          is_causal=True)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2)
  fn = functools.partial(sq.based_attention, chunk_size=4, block_size=4)
  ref = sq.based_attention_reference
  kw = dict(window_size=3, is_causal=True)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(ValueError, match="head_dim"):
    sq.based_attention(q, k[..., :5], v)
  with pytest.raises(ValueError, match="window_size"):
    sq.based_attention(q, k, v, window_size=None)
  with pytest.raises(ValueError, match="window_size"):
    sq.based_attention(q, k, v, window_size=-2)
  with pytest.raises(ValueError, match="implementation"):
    sq.based_attention(q, k, v, implementation="nope")
  with pytest.raises(NotImplementedError, match="bias"):
    sq.based_attention(q, k, v, bias=jnp.ones((12, 12)))


def test_layer():
  layer = sq.BasedAttention(4, 16, num_kv_heads=2, head_dim=8, window_size=2,
                            chunk_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.based_attention_reference(q, k, v, window_size=2,
                                                is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y2 = layer(x.at[:, 9:].set(3.0), is_causal=True)
  np.testing.assert_allclose(y2[:, :9], y[:, :9], rtol=1e-5, atol=1e-5)
