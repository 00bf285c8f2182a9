"""FAST (Fastmax): normalized q, k with the truncated-exp score, against an
explicit float64 [T, S] computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc


def _ref64(q, k, v, *, order=2, is_causal=False, mask=None, chunk_size=None):
  def norm(x):
    x = x - x.mean(-1, keepdims=True)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  qn, kn = norm(q), norm(k)
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hd in range(n):
      x = qn[bi, :, hd] @ kn[bi, :, hd // g].T                # [t, s]
      f = 1 + x + (x * x / 2 if order == 2 else 0)
      ok = keep[bi][None, :] & (
          (np.arange(s)[None, :] <= np.arange(t)[:, None]) if is_causal
          else True)
      f = np.where(ok, f, 0.0)
      den = f.sum(1, keepdims=True)
      out[bi, :, hd] = np.where(den > 0, f / np.where(den > 0, den, 1), 0) @ (
          v[bi, :, hd // g])
  return out


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False),
                                          (False, True), (True, True)])
@pytest.mark.parametrize("order", [1, 2])
def test_four_patterns_match_float64(causal, cross, order):
  q, k, v = zc.inputs(0, t=11, s=8 if cross else 11)
  fn = functools.partial(sq.fast_attention, chunk_size=4)
  zc.check_values(fn, _ref64, q, k, v, order=order, is_causal=causal)


def test_scores_bounded_and_scale_invariant():
  # Normalization makes Fastmax invariant to scaling and shifting q and k.
  q, k, v = zc.inputs(1)
  a = sq.fast_attention(q, k, v)
  b = sq.fast_attention(7.0 * q + 3.0, 0.1 * k - 2.0, v)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2)
  fn = functools.partial(sq.fast_attention, chunk_size=4)
  ref = sq.fast_attention_reference
  kw = dict(is_causal=True)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(ValueError, match="order"):
    sq.fast_attention(q, k, v, order=3)
  with pytest.raises(ValueError, match="head_dim"):
    sq.fast_attention(q, k[..., :5], v)
  with pytest.raises(ValueError, match="implementation"):
    sq.fast_attention(q, k, v, implementation="nope")
  with pytest.raises(NotImplementedError, match="bias"):
    sq.fast_attention(q, k, v, bias=jnp.ones((12, 12)))


def test_layer():
  layer = sq.FASTAttention(4, 16, num_kv_heads=2, head_dim=8, chunk_size=4,
                           rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.fast_attention_reference(q, k, v, is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
