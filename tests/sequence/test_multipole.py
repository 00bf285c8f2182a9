"""Multipole attention (MANO V-cycle on sequences) against a float64 NumPy
re-derivation: pooled levels, banded softmax each, nearest upsampling, sum."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc


def _band_softmax64(q, k, v, w, keep, h):
  t, s = q.shape[0], k.shape[0]
  out = np.zeros((t, v.shape[-1]))
  for i in range(t):
    ok = keep & (np.abs(np.arange(s) - i) <= w)
    if ok.any():
      z = np.where(ok, k @ q[i] / np.sqrt(h), -np.inf)
      p = np.exp(z - z.max())
      out[i] = p @ v / p.sum()
  return out


def _pool64(x, f, keep):
  n = -(-len(x) // f)
  out = np.zeros((n,) + x.shape[1:])
  ok = np.zeros(n, bool)
  for j in range(n):
    sl = slice(j * f, (j + 1) * f)
    m = keep[sl]
    if m.any():
      out[j] = x[sl][m].mean(0)
      ok[j] = True
  return out, ok


def _ref64(q, k, v, *, window_size=1, levels=None, mask=None,
           is_causal=False):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  levels = levels or sq.default_levels(max(t, s), window_size)
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hd in range(n):
      for lvl in range(levels):
        f = 2 ** lvl
        qp, _ = _pool64(q[bi, :, hd], f, np.ones(t, bool))
        kp, kok = _pool64(k[bi, :, hd // g], f, keep[bi])
        vp, _ = _pool64(v[bi, :, hd // g], f, keep[bi])
        o = _band_softmax64(qp, kp, vp, window_size, kok, h)
        out[bi, :, hd] += np.repeat(o, f, axis=0)[:t]
  return out


@pytest.mark.parametrize("cross", [False, True])
def test_noncausal_self_and_cross_match_float64(cross):
  q, k, v = zc.inputs(0, t=21, s=13 if cross else 21)
  zc.check_values(sq.multipole_attention, _ref64, q, k, v, window_size=1)
  zc.check_values(sq.multipole_attention, _ref64, q, k, v, window_size=2,
                  levels=2)


def test_default_levels_reach_globally():
  assert sq.default_levels(16, 2) == 3       # 16 / 2**2 = 4 <= 5 tokens
  assert sq.default_levels(5, 2) == 1
  # With the default levels a change at a far key reaches every query.
  q, k, v = zc.inputs(1, t=16)
  v2 = v.at[:, -1].add(5.0)
  f = jax.jit(functools.partial(sq.multipole_attention, window_size=1))
  a, b = f(q, k, v), f(q, k, v2)
  assert np.all(np.abs(np.asarray(a - b))[:, 0] > 0)
  # One level is a plain window: the change stays local.
  f1 = jax.jit(functools.partial(sq.multipole_attention, window_size=1,
                                 levels=1))
  np.testing.assert_allclose(f1(q, k, v2)[:, :14], f1(q, k, v)[:, :14],
                             rtol=1e-6, atol=1e-6)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2)
  fn, ref = sq.multipole_attention, sq.multipole_attention_reference
  kw = dict(window_size=1)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(NotImplementedError, match="causal"):
    sq.multipole_attention(q, k, v, is_causal=True)
  with pytest.raises(ValueError, match="window_size"):
    sq.multipole_attention(q, k, v, window_size=-1)
  with pytest.raises(ValueError, match="levels"):
    sq.multipole_attention(q, k, v, levels=0)
  with pytest.raises(ValueError, match="head_dim"):
    sq.multipole_attention(q, k[..., :5], v)
  with pytest.raises(ValueError, match="implementation"):
    sq.multipole_attention(q, k, v, implementation="nope")


def test_layer():
  layer = sq.MultipoleAttention(4, 16, num_kv_heads=2, head_dim=8,
                                window_size=1, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.multipole_attention_reference(q, k, v, window_size=1))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
