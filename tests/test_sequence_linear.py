"""linear_attention: chunk-wise causal form vs cumulative-sum reference vs a
float64 NumPy quadratic definition; GQA, masks, dtypes, jit/vmap, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax.sequence import linear_attention, linear_attention_reference

FMAPS_NP = {
    "elu_plus_one": lambda x: np.where(x > 0, x + 1.0, np.exp(x)),
    "relu": lambda x: np.maximum(x, 0.0),
    "identity": lambda x: x,
}


def _np_linear(q, k, v, fmap, causal, normalize, scale=1.0, kv_mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, _ = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  fq, fk = FMAPS_NP[fmap](q), FMAPS_NP[fmap](k)
  fk = np.repeat(fk, g, axis=2)
  vv = np.repeat(v, g, axis=2)
  sc = np.einsum("btnf,bsnf->bnts", fq, fk)
  allow = np.ones((t, s), bool)
  if causal:
    allow &= np.arange(s)[None, :] <= np.arange(t)[:, None]
  allow = np.broadcast_to(allow, (b, 1, t, s))
  if kv_mask is not None:
    allow = allow & kv_mask[:, None, None, :]
  sc = np.where(allow, sc, 0.0)
  num = np.einsum("bnts,bsnd->btnd", sc, vv)
  if not normalize:
    return num * scale
  den = sc.sum(-1).transpose(0, 2, 1)[..., None]
  return np.where(den != 0, num / np.where(den != 0, den, 1.0), 0.0)


def _inputs(b=2, t=19, s=19, n=4, kh=2, h=8, hv=6, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), dtype)
  v = jax.random.normal(ks[2], (b, s, kh, hv), dtype)
  return q, k, v


@pytest.mark.parametrize("fmap", ["elu_plus_one", "relu", "identity"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(19, 19), (21, 13)])
def test_matches_numpy(fmap, causal, t, s):
  q, k, v = _inputs(t=t, s=s)
  normalize = fmap != "identity"   # identity + normalize is ill-conditioned
  want = _np_linear(q, k, v, fmap, causal, normalize, scale=0.5)
  for cs in ((7,) if t != s else (4, 64)):
    got = linear_attention(q, k, v, feature_map=fmap, is_causal=causal,
                           normalize=normalize, scale=0.5, chunk_size=cs)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  ref = linear_attention_reference(q, k, v, feature_map=fmap, is_causal=causal,
                                   normalize=normalize, scale=0.5)
  np.testing.assert_allclose(ref, want, rtol=2e-5, atol=2e-5)


def test_identity_unnormalized_is_scaled_qkT_v():
  # The softmax-free variant used by the in-context regression study.
  q, k, v = _inputs(n=2, kh=2)
  got = linear_attention(q, k, v, feature_map="identity", normalize=False,
                         scale=0.25)
  want = 0.25 * jnp.einsum("btnh,bsnh,bsnd->btnd", q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  got_c = linear_attention(q, k, v, feature_map="identity", normalize=False,
                           is_causal=True, chunk_size=5)
  want_c = jnp.einsum("bnts,bsnd->btnd",
                      jnp.tril(jnp.einsum("btnh,bsnh->bnts", q, k)), v)
  np.testing.assert_allclose(got_c, want_c, rtol=1e-5, atol=1e-4)


def test_callable_feature_map_changes_feature_size():
  q, k, v = _inputs()
  fm = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1) + 0.1
  got = linear_attention(q, k, v, feature_map=fm, is_causal=True, chunk_size=4)
  ref = linear_attention_reference(q, k, v, feature_map=fm, is_causal=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference(causal):
  q, k, v = _inputs(t=11, s=11)
  w = jax.random.normal(jax.random.key(3), (2, 11, 4, 6))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, is_causal=causal) * w)

  f = functools.partial(linear_attention, chunk_size=4)
  g1 = jax.grad(functools.partial(loss, f), argnums=(0, 1, 2))(q, k, v)
  g2 = jax.grad(functools.partial(loss, linear_attention_reference),
                argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16(causal):
  q, k, v = _inputs(dtype=jnp.bfloat16)
  got = linear_attention(q, k, v, is_causal=causal, chunk_size=8)
  assert got.dtype == jnp.bfloat16
  want = _np_linear(q.astype(jnp.float32), k.astype(jnp.float32),
                    v.astype(jnp.float32), "elu_plus_one", causal, True)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=3e-2)
  gq = jax.grad(lambda q: jnp.sum(linear_attention(q, k, v, is_causal=causal)
                                  .astype(jnp.float32)))(q)
  gr = jax.grad(lambda q: jnp.sum(linear_attention_reference(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
      is_causal=causal)))(q.astype(jnp.float32))
  assert gq.dtype == jnp.bfloat16
  np.testing.assert_allclose(gq.astype(jnp.float32), gr, atol=5e-2, rtol=5e-2)


def test_jit_vmap_unbatched():
  q, k, v = _inputs()
  f = jax.jit(functools.partial(linear_attention, is_causal=True, chunk_size=8))
  want = linear_attention_reference(q, k, v, is_causal=True)
  np.testing.assert_allclose(f(q, k, v), want, rtol=1e-5, atol=1e-5)
  vm = jax.vmap(f)(q, k, v)   # vmap over batch: unbatched rank-3 inputs
  np.testing.assert_allclose(vm, want, rtol=1e-5, atol=1e-5)


def test_key_padding_mask_and_fully_masked_rows():
  q, k, v = _inputs(t=9, s=9)
  lengths = np.array([5, 0])
  kv_mask = np.arange(9)[None, :] < lengths[:, None]
  for causal in (False, True):
    got = linear_attention(q, k, v, is_causal=causal, chunk_size=4,
                           mask=jnp.asarray(kv_mask)[:, None, None, :])
    want = _np_linear(q, k, v, "elu_plus_one", causal, True, kv_mask=kv_mask)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.any(np.isnan(got))
    np.testing.assert_array_equal(got[1], 0.0)   # batch 1: no keys at all


def test_errors():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="feature_map"):
    linear_attention(q, k, v, feature_map="softmax")
  with pytest.raises(ValueError, match="key.*head_dim"):
    linear_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match=r"query.*heads.*\(4\).*\(3\)"):
    linear_attention(q, jnp.ones((2, 19, 3, 8)), jnp.ones((2, 19, 3, 6)))
  with pytest.raises(ValueError, match="chunk_size"):
    linear_attention(q, k, v, is_causal=True, chunk_size=0)
  with pytest.raises(ValueError, match="mask.*not broadcastable"):
    linear_attention(q, k, v, mask=jnp.ones((2, 1, 1, 7), bool))
  with pytest.raises(NotImplementedError, match="key-padding"):
    linear_attention(q, k, v, mask=jnp.ones((19, 19), bool))
  with pytest.raises(NotImplementedError, match="bias"):
    linear_attention(q, k, v, bias=jnp.zeros((19, 19)))


def test_multihead_attention_layer():
  layer = attnjax.MultiHeadAttention(
      4, 16, num_kv_heads=2, head_dim=8,
      attention_fn=functools.partial(linear_attention, chunk_size=4),
      rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 16))
  y = layer(x, is_causal=True)
  q, k, v = layer.project_qkv(x)
  want = layer.out(linear_attention_reference(q, k, v, is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  # Causality: changing a later token leaves earlier outputs unchanged.
  x2 = x.at[:, 7].set(5.0)
  np.testing.assert_allclose(layer(x2, is_causal=True)[:, :7], y[:, :7],
                             rtol=1e-5, atol=1e-5)
