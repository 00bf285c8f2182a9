"""Additive (Bahdanau) attention and the Pointer-Network pointer vs a float64
NumPy evaluation; four patterns, general masks, masked-slot invariance,
grads, bf16, jit/vmap, chunking, errors, layers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import additive as ad
from tests.sequence import zoo_checks as zc

B, T, S, N, K, D, HV = 2, 7, 5, 4, 2, 6, 3


def _np_probs(q, k, w, mask=None, causal=False):
  q, k, w = (np.asarray(x, np.float64) for x in (q, k, w))
  b, t, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  e = np.zeros((b, n, t, s))
  for h in range(n):
    z = np.tanh(q[:, :, None, h] + k[:, None, :, h // g])   # [b, t, s, d]
    e[:, h] = z @ w[h]
  ok = np.ones((b, n, t, s), bool)
  if mask is not None:
    ok &= np.broadcast_to(np.asarray(mask), ok.shape)
  if causal:
    ok &= np.arange(s)[None, :] <= np.arange(t)[:, None]
  e = np.where(ok, e, -np.inf)
  mx = np.max(e, -1, keepdims=True)
  p = np.where(ok, np.exp(e - np.where(np.isfinite(mx), mx, 0)), 0)
  den = p.sum(-1, keepdims=True)
  return p / np.where(den > 0, den, 1)


def _np_out(q, k, v, w, mask=None, causal=False):
  p = _np_probs(q, k, w, mask, causal)
  n, kh = q.shape[2], k.shape[2]
  v = np.asarray(v, np.float64)
  out = np.stack([p[:, h] @ v[:, :, h // (n // kh)] for h in range(n)], 2)
  return out


def _data(t=T, s=S, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, t, N, D), dtype),
          jax.random.normal(ks[1], (B, s, K, D), dtype),
          jax.random.normal(ks[2], (B, s, K, HV), dtype),
          jax.random.normal(ks[3], (N, D)))


MASK = jax.random.bernoulli(jax.random.key(5), 0.7, (B, 1, T, S)).at[1, :, 2].set(
    False)                                    # query row 2 of batch 1 empty


@pytest.mark.parametrize("s", [T, S], ids=["self", "cross"])
def test_four_patterns_and_general_masks_vs_float64(s):
  q, k, v, w = _data(s=s)
  mask = MASK[..., :s] if s <= S else None
  f = jax.jit(functools.partial(ad.additive_attention,
                                implementation=ad.AdditiveXla(query_chunk=3)),
              static_argnames="is_causal")
  for causal in (False, True):
    got = f(q, k, v, w, mask=mask, is_causal=causal)
    np.testing.assert_allclose(got, _np_out(q, k, v, w, mask, causal),
                               rtol=1e-5, atol=1e-5)
    p = ad.pointer_attention(q, k, w, mask=mask, is_causal=causal)
    np.testing.assert_allclose(p, _np_probs(q, k, w, mask, causal), rtol=1e-5,
                               atol=1e-6)
  if mask is not None:
    np.testing.assert_array_equal(got[1, 2], 0.0)    # fully masked row
    np.testing.assert_array_equal(p[1, :, 2], 0.0)


def test_grads_match_reference_and_masked_slots_are_invariant():
  q, k, v, w = _data(seed=1)
  keep = jnp.arange(S)[None, :] < jnp.array([4, 2])[:, None]
  mask = keep[:, None, None, :]
  c = jax.random.normal(jax.random.key(2), (B, T, N, HV))

  def loss(fn, q, k, v, w):
    return jnp.sum(fn(q, k, v, w, mask=mask, is_causal=True) * c)

  g = jax.jit(jax.value_and_grad(
      functools.partial(loss, functools.partial(
          ad.additive_attention, implementation=ad.AdditiveXla(query_chunk=2))),
      argnums=(0, 1, 2, 3)))
  _, g1 = zc.check_poisoned_slots_unchanged(g, (q, k, v, w), keep,
                                            zero_grad_argnum=1)
  g2 = jax.grad(functools.partial(loss, ad.additive_attention_reference),
                argnums=(0, 1, 2, 3))(q, k, v, w)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_and_vmap():
  q, k, v, w = _data(seed=3)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = ad.additive_attention(bf(q), bf(k), bf(v), w, is_causal=True)
  assert got.dtype == jnp.bfloat16
  want = _np_out(bf(q).astype(jnp.float32), bf(k).astype(jnp.float32),
                 bf(v).astype(jnp.float32), w, causal=True)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2,
                             rtol=3e-2)
  f = functools.partial(ad.additive_attention, weight=w)
  np.testing.assert_allclose(jax.vmap(f)(q, k, v), f(q, k, v), rtol=1e-5,
                             atol=1e-5)


def test_value_errors_name_arguments():
  q, k, v, w = _data()
  with pytest.raises(ValueError, match=r"`weight`.*\[4, 6\].*\(4, 5\)"):
    ad.additive_attention(q, k, v, w[:, :5])
  with pytest.raises(ValueError, match="head_dim"):
    ad.additive_attention(q, k[..., :5], v, w)
  with pytest.raises(ValueError, match="mask"):
    ad.additive_attention(q, k, v, w, mask=jnp.ones((3, S), bool))
  with pytest.raises(ValueError, match="implementation"):
    ad.additive_attention(q, k, v, w, implementation="pallas")
  with pytest.raises(NotImplementedError, match="bias"):
    ad.additive_attention(q, k, v, w, bias=jnp.ones((T, S)))


def test_layers():
  rngs = nnx.Rngs(0)
  layer = ad.AdditiveAttention(4, 16, num_kv_heads=2, head_dim=6,
                               query_chunk=5, rngs=rngs)
  x = jax.random.normal(jax.random.key(1), (2, 9, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, kk, vv = layer.project_qkv(x)
  want = layer.out(jnp.asarray(_np_out(q, kk, vv, layer.weight.value,
                                       causal=True), jnp.float32))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  g = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
  assert float(jnp.max(jnp.abs(g.weight.value))) > 0
  ptr = ad.PointerNetwork(5, 7, 8, rngs=rngs)
  enc = jax.random.normal(jax.random.key(2), (2, 6, 5))
  dec = jax.random.normal(jax.random.key(3), (2, 4, 7))
  pad = jnp.arange(6)[None, :] < jnp.array([6, 3])[:, None]
  p = ptr(dec, enc, mask=pad)
  assert p.shape == (2, 4, 6)
  np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p[1, :, 3:], 0.0)
  want = _np_probs(ptr.w_dec(dec)[..., None, :], ptr.w_enc(enc)[..., None, :],
                   ptr.v.value, pad[:, None, None, :])[:, 0]
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)
