"""Lambda layers (content + local position lambdas, 1D and 2D) vs a float64
NumPy evaluation of the paper's equations; key padding, masked-slot
invariance, grads, bf16, vmap, refusals, errors, the layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import lambda_layer as ll
from tests.sequence import zoo_checks as zc

B, T, S, N, K, KD, VD, R = 2, 9, 6, 4, 2, 5, 3, 5


def _np_lambda(q, k, v, e=None, keep=None, grid=None):
  """q [B, P, N, kd], k [B, M, K, kd], v [B, M, K, vd]; e [r.., kd]; keep
  [B, M]; grid: (dims of the query = context grid) for position lambdas."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, p, n, kd = q.shape
  m, kh = k.shape[1], k.shape[2]
  keep = np.ones((b, m), bool) if keep is None else np.asarray(keep)
  out = np.zeros((b, p, n, v.shape[-1]))
  for bi in range(b):
    for h in range(kh):
      kk, vv = k[bi, keep[bi], h], v[bi, keep[bi], h]
      if len(kk):
        kbar = np.exp(kk - kk.max(0)) / np.exp(kk - kk.max(0)).sum(0)
        lam_c = kbar.T @ vv
      else:
        lam_c = np.zeros((kd, v.shape[-1]))
      for pi in range(p):
        lam = lam_c.copy()
        if e is not None:
          r = e.shape[0]
          pos_n = np.unravel_index(pi, grid)
          for mi in range(m):
            if not keep[bi, mi]:
              continue
            rel = np.array(np.unravel_index(mi, grid)) - pos_n + r // 2
            if np.all((rel >= 0) & (rel < r)):
              lam += np.outer(np.asarray(e, np.float64)[tuple(rel)], v[bi, mi, h])
        for g in range(n // kh):
          hh = h * (n // kh) + g
          out[bi, pi, hh] = lam.T @ q[bi, pi, hh]
  return out


def _data(t=T, s=T, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, t, N, KD), dtype),
          jax.random.normal(ks[1], (B, s, K, KD), dtype),
          jax.random.normal(ks[2], (B, s, K, VD), dtype),
          jax.random.normal(ks[3], (R, KD)))


KEEP = jnp.arange(T)[None, :] < jnp.array([6, 0])[:, None]


def test_1d_content_and_position_lambdas_vs_float64():
  q, k, v, e = _data()
  f = jax.jit(ll.lambda_attention)
  for emb in (None, e):
    for keep in (None, KEEP):
      mask = None if keep is None else keep[:, None, None, :]
      got = f(q, k, v, position_embeddings=emb, mask=mask)
      want = _np_lambda(q, k, v, emb, keep, (T,))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(
          ll.lambda_attention_reference(q, k, v, position_embeddings=emb,
                                        mask=mask), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[1], 0.0)     # no context -> zeros
  # cross (content lambda)
  q, k, v, _ = _data(s=S, seed=1)
  np.testing.assert_allclose(f(q, k, v), _np_lambda(q, k, v), rtol=1e-5,
                             atol=1e-5)


def test_2d_position_lambdas_vs_float64():
  hh, ww = 4, 5
  ks = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(ks[0], (B, hh, ww, N, KD))
  k = jax.random.normal(ks[1], (B, hh, ww, K, KD))
  v = jax.random.normal(ks[2], (B, hh, ww, K, VD))
  e = jax.random.normal(ks[3], (3, 3, KD))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (B, hh, ww))
  got = jax.jit(ll.lambda_attention_2d)(q, k, v, position_embeddings=e,
                                        mask=mask)
  flat = lambda x: x.reshape(B, hh * ww, *x.shape[3:])
  want = _np_lambda(flat(q), flat(k), flat(v), e, mask.reshape(B, -1),
                    (hh, ww)).reshape(got.shape)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      ll.lambda_attention_2d_reference(q, k, v, position_embeddings=e,
                                       mask=mask), want, rtol=1e-5, atol=1e-5)


def test_grads_and_masked_slot_invariance():
  q, k, v, e = _data(seed=4)
  keep = jnp.arange(T)[None, :] < jnp.array([6, 3])[:, None]
  mask = keep[:, None, None, :]
  c = jax.random.normal(jax.random.key(5), (B, T, N, VD))

  def loss(fn, q, k, v, e):
    return jnp.sum(fn(q, k, v, position_embeddings=e, mask=mask) * c)

  g = jax.jit(jax.value_and_grad(functools.partial(loss, ll.lambda_attention),
                                 argnums=(0, 1, 2, 3)))
  _, g1 = zc.check_poisoned_slots_unchanged(g, (q, k, v, e), keep,
                                            zero_grad_argnum=2)
  g2 = jax.grad(functools.partial(loss, ll.lambda_attention_reference),
                argnums=(0, 1, 2, 3))(q, k, v, e)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_vmap_and_refusals():
  q, k, v, e = _data(seed=6)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = ll.lambda_attention(bf(q), bf(k), bf(v), position_embeddings=e)
  assert got.dtype == jnp.bfloat16
  want = _np_lambda(*(bf(x).astype(jnp.float32) for x in (q, k, v)), e,
                    None, (T,))
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2,
                             rtol=5e-2)
  f = functools.partial(ll.lambda_attention, position_embeddings=e)
  np.testing.assert_allclose(jax.vmap(f)(q, k, v), f(q, k, v), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(NotImplementedError, match="causal"):
    ll.lambda_attention(q, k, v, is_causal=True)
  with pytest.raises(NotImplementedError, match="key-padding"):
    ll.lambda_attention(q, k, v, mask=jnp.ones((T, T), bool))


def test_value_errors_name_arguments():
  q, k, v, e = _data()
  with pytest.raises(ValueError, match=r"`position_embeddings`.*\(4, 5\)"):
    ll.lambda_attention(q, k, v, position_embeddings=e[:4])
  with pytest.raises(ValueError, match=r"query positions \(9,\).*\(6,\)"):
    ll.lambda_attention(q, k[:, :S], v[:, :S], position_embeddings=e)
  with pytest.raises(ValueError, match="head_dim"):
    ll.lambda_attention(q, k[..., :4], v)
  with pytest.raises(ValueError, match=r"`query`.*\[batch, height"):
    ll.lambda_attention_2d(q, k, v)
  with pytest.raises(ValueError, match="receptive_field"):
    ll.LambdaLayer(8, 8, receptive_field=4, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("image", [False, True])
def test_layer(image):
  layer = ll.LambdaLayer(6, 8, num_heads=4, key_dim=4, num_kv_heads=1,
                         receptive_field=3, image=image, rngs=nnx.Rngs(0))
  shape = (2, 4, 5, 6) if image else (2, 7, 6)
  x = jax.random.normal(jax.random.key(1), shape)
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.shape == shape[:-1] + (8,)
  lead = shape[:-1]
  q = layer.to_q(x).reshape(lead + (4, 4))
  k = layer.to_k(x).reshape(lead + (1, 4))
  v = layer.to_v(x).reshape(lead + (1, 2))
  flat = lambda a: a.reshape(2, -1, *a.shape[-2:])
  want = _np_lambda(flat(q), flat(k), flat(v), layer.position_embeddings.value,
                    None, shape[1:-1])
  np.testing.assert_allclose(y, want.reshape(y.shape), rtol=1e-5, atol=1e-5)
  g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  assert float(jnp.max(jnp.abs(g.position_embeddings.value))) > 0
