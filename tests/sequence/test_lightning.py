"""Decayed causal linear attention (Lightning Attention-2 / RetNet retention):
`linear_attention(..., decay=)` and `lightning_attention` against the
explicit float64 decayed causal sum."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc

DECAY = np.array([0.5, 0.8, 0.95, 1.0])


def _ref64(q, k, v, *, decay, feature_map="identity", normalize=False,
           scale=None, mask=None, is_causal=True):
  """Explicit sum_j<=i decay**(i-j) phi(q_i).phi(k_j) v_j, float64."""
  assert is_causal
  phi = {"identity": lambda x: x,
         "elu_plus_one": lambda x: np.where(x > 0, x + 1, np.exp(x))}[
             feature_map]
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  if scale is None:
    scale = 1.0 / np.sqrt(h) if not normalize else 1.0
  fq, fk = phi(q), phi(k)
  out = np.zeros((b, t, n, v.shape[-1]))
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  lam = np.broadcast_to(np.asarray(decay, np.float64), (n,))
  for hd in range(n):
    for i in range(t):
      num = np.zeros((b, v.shape[-1]))
      den = np.zeros(b)
      for j in range(min(i + 1, s)):
        w = np.sum(fq[:, i, hd] * fk[:, j, hd // g], -1) * lam[hd] ** (i - j)
        w = np.where(keep[:, j], w, 0.0)
        num += w[:, None] * np.where(keep[:, j, None], v[:, j, hd // g], 0.0)
        den += w
      if normalize:
        out[:, i, hd] = np.where(den[:, None] != 0,
                                 num / np.where(den == 0, 1, den)[:, None], 0)
      else:
        out[:, i, hd] = scale * num
  return out


@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_lightning_matches_float64_decayed_sum(chunk):
  q, k, v = zc.inputs(0, t=23)
  fn = functools.partial(sq.lightning_attention, chunk_size=chunk)
  zc.check_values(fn, _ref64, q, k, v, decay=DECAY)


def test_linear_attention_decay_normalized_elu_and_cross():
  q, k, v = zc.inputs(1, t=13, s=9)
  fn = functools.partial(sq.linear_attention, chunk_size=4, is_causal=True)
  zc.check_values(fn, functools.partial(_ref64, feature_map="elu_plus_one",
                                        normalize=True),
                  q, k, v, decay=DECAY)


def test_decay_spanning_several_scan_groups():
  # 600 positions with chunk 16: several 512-position scan groups, so the
  # state decays through group boundaries as well as chunk boundaries.
  q, k, v = zc.inputs(2, b=1, t=600, n=2, k=1, h=4, hv=3)
  d = np.array([0.9, 0.995])
  got = sq.lightning_attention(q, k, v, d, chunk_size=16)
  want = sq.lightning_attention_reference(q, k, v, d)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_decay_one_equals_plain_causal_linear_attention():
  q, k, v = zc.inputs(3)
  a = sq.linear_attention(q, k, v, is_causal=True, decay=1.0, chunk_size=4)
  b = sq.linear_attention(q, k, v, is_causal=True, chunk_size=4)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(4)
  fn = functools.partial(sq.lightning_attention, chunk_size=4)
  ref = sq.lightning_attention_reference
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, decay=DECAY)


def test_decay_gradient_is_finite_and_matches_reference():
  q, k, v = zc.inputs(5, t=9)
  loss = lambda f, d: jnp.sum(f(q, k, v, d) ** 2)
  g1 = jax.grad(functools.partial(loss, functools.partial(
      sq.lightning_attention, chunk_size=4)))(jnp.asarray(DECAY, jnp.float32))
  g2 = jax.grad(functools.partial(loss, sq.lightning_attention_reference))(
      jnp.asarray(DECAY, jnp.float32))
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4)


def test_errors():
  q, k, v = zc.inputs(6)
  with pytest.raises(ValueError, match="decay"):
    sq.lightning_attention(q, k, v, np.array([0.5, 0.5]))
  with pytest.raises(ValueError, match="decay"):
    sq.linear_attention(q, k, v, is_causal=True, decay=1.5)
  with pytest.raises(ValueError, match="decay"):
    sq.lightning_attention(q, k, v, None)
  with pytest.raises(NotImplementedError, match="causal"):
    sq.linear_attention(q, k, v, decay=0.9)
  with pytest.raises(NotImplementedError, match="causal"):
    sq.lightning_attention(q, k, v, 0.9, is_causal=False)
  with pytest.raises(ValueError, match="head_dim"):
    sq.lightning_attention(q, k[..., :5], v, 0.9)


def test_retnet_decays_and_layer():
  np.testing.assert_allclose(sq.retnet_decays(3),
                             [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128])
  layer = sq.LightningAttention(4, 16, num_kv_heads=2, head_dim=8,
                                chunk_size=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.lightning_attention_reference(
      q, k, v, jnp.asarray(sq.retnet_decays(4), jnp.float32)))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y2 = layer(x.at[:, 9:].set(3.0), is_causal=True)
  np.testing.assert_allclose(y2[:, :9], y[:, :9], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="decay"):
    sq.LightningAttention(4, 16, decay=[0.5, 0.5], rngs=nnx.Rngs(0))
