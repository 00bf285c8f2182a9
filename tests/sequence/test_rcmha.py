"""RCMHA vs a float64 NumPy evaluation (explicit depth-wise convolution loops
and clipped relative embeddings); four patterns, masks, masked-slot
invariance (NaN cannot spread through the convolution), no causal leak,
grads, bf16, vmap, errors, the layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.sequence import rcmha as rc

B, T, S, N, K, H, HV, W, M = 2, 8, 6, 4, 2, 5, 3, 3, 2


def _np_conv(x, kern, causal):
  x, kern = np.asarray(x, np.float64), np.asarray(kern, np.float64)
  w = kern.shape[0]
  left = w - 1 if causal else (w - 1) // 2
  out = np.zeros_like(x)
  for t in range(x.shape[1]):
    for u in range(w):
      src = t - left + u
      if 0 <= src < x.shape[1]:
        out[:, t] += kern[u] * x[:, src]
  return out


def _np_rcmha(q, k, v, rel, cq, ck, cv, keep=None, causal=False):
  q, k, v, rel = (np.asarray(x, np.float64) for x in (q, k, v, rel))
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  if keep is not None:
    k = np.where(np.asarray(keep)[:, :, None, None], k, 0)
    v = np.where(np.asarray(keep)[:, :, None, None], v, 0)
  q, k, v = _np_conv(q, cq, causal), _np_conv(k, ck, causal), _np_conv(v, cv, causal)
  m = (rel.shape[0] - 1) // 2
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hh in range(n):
      g = hh // (n // kh)
      for i in range(t):
        e = np.array([q[bi, i, hh] @ (k[bi, j, g] + rel[np.clip(j - i, -m, m) + m, hh])
                      for j in range(s)]) / np.sqrt(h)
        ok = np.ones(s, bool)
        if keep is not None:
          ok &= np.asarray(keep[bi])
        if causal:
          ok &= np.arange(s) <= i
        if ok.any():
          p = np.where(ok, np.exp(e - e[ok].max()), 0)
          out[bi, i, hh] = p / p.sum() @ v[bi, :, g]
  return out


def _data(s=T, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 7)
  return (jax.random.normal(ks[0], (B, T, N, H), dtype),
          jax.random.normal(ks[1], (B, s, K, H), dtype),
          jax.random.normal(ks[2], (B, s, K, HV), dtype),
          jax.random.normal(ks[3], (2 * M + 1, N, H)),
          dict(conv_q=jax.random.normal(ks[4], (W, N, H)),
               conv_k=jax.random.normal(ks[5], (W, K, H)),
               conv_v=jax.random.normal(ks[6], (W, K, HV))))


@pytest.mark.parametrize("s", [T, S], ids=["self", "cross"])
def test_four_patterns_vs_float64(s):
  q, k, v, rel, cv = _data(s=s)
  f = jax.jit(rc.rcmha_attention, static_argnames="is_causal")
  for causal in (False, True):
    got = f(q, k, v, rel, is_causal=causal, **cv)
    want = _np_rcmha(q, k, v, rel, cv["conv_q"], cv["conv_k"], cv["conv_v"],
                     causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rc.rcmha_attention_reference(
        q, k, v, rel, is_causal=causal, **cv), want, rtol=1e-4, atol=1e-5)


def test_causal_no_future_leak_and_masked_slots():
  q, k, v, rel, cv = _data(seed=1)
  out = rc.rcmha_attention(q, k, v, rel, is_causal=True, **cv)
  k2, v2 = k.at[:, 5:].set(7.0), v.at[:, 5:].set(-7.0)
  q2 = q.at[:, 5:].set(3.0)
  out2 = rc.rcmha_attention(q2, k2, v2, rel, is_causal=True, **cv)
  np.testing.assert_allclose(out2[:, :5], out[:, :5], rtol=1e-5, atol=1e-6)
  keep = jnp.arange(T)[None, :] < jnp.array([5, 0])[:, None]
  mask = keep[:, None, None, :]
  c = jax.random.normal(jax.random.key(4), (B, T, N, HV))

  def loss(fn, q, k, v, rel):
    return jnp.sum(fn(q, k, v, rel, mask=mask, **cv) * c)

  g = jax.jit(jax.value_and_grad(functools.partial(loss, rc.rcmha_attention),
                                 argnums=(0, 1, 2, 3)))
  val, g1 = g(q, k, v, rel)
  got = rc.rcmha_attention(q, k, v, rel, mask=mask, **cv)
  want = _np_rcmha(q, k, v, rel, cv["conv_q"], cv["conv_k"], cv["conv_v"],
                   keep=keep)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[1], 0.0)
  g2 = jax.grad(functools.partial(loss, rc.rcmha_attention_reference),
                argnums=(0, 1, 2, 3))(q, k, v, rel)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for poison in (np.nan, np.inf, -np.inf):
    kp = jnp.where(keep[:, :, None, None], k, poison)
    vp = jnp.where(keep[:, :, None, None], v, poison)
    val2, g3 = g(q, kp, vp, rel)
    np.testing.assert_array_equal(val2, val)
    for a, b in zip(g3, g1):
      np.testing.assert_array_equal(a, b)


def test_bf16_vmap_and_errors():
  q, k, v, rel, cv = _data(seed=2)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = rc.rcmha_attention(bf(q), bf(k), bf(v), rel, is_causal=True, **cv)
  assert got.dtype == jnp.bfloat16
  want = _np_rcmha(*(bf(x).astype(jnp.float32) for x in (q, k, v)), rel,
                   cv["conv_q"], cv["conv_k"], cv["conv_v"], causal=True)
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=6e-2,
                             rtol=6e-2)
  f = functools.partial(rc.rcmha_attention, rel_embeddings=rel, **cv)
  np.testing.assert_allclose(jax.vmap(f)(q, k, v), f(q, k, v), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"`rel_embeddings`.*\(4, 4, 5\)"):
    rc.rcmha_attention(q, k, v, rel[:4])
  with pytest.raises(ValueError, match=r"`conv_k`.*\[width, 2, 5\]"):
    rc.rcmha_attention(q, k, v, rel, conv_k=cv["conv_q"])
  with pytest.raises(ValueError, match="head_dim"):
    rc.rcmha_attention(q, k[..., :4], v, rel)


def test_layer():
  layer = rc.RCMHAttention(N, 8, num_kv_heads=K, head_dim=H, conv_width=W,
                           max_distance=M, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, T, 8))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  eye = np.zeros((W, 1, 1))
  eye[W - 1] = 1.0
  want = _np_rcmha(q, k, v, layer.rel_embeddings.value, eye + np.zeros((1, N, H)),
                   eye + np.zeros((1, K, H)), eye + np.zeros((1, K, H)),
                   causal=True)
  np.testing.assert_allclose(y, layer.out(jnp.asarray(want, jnp.float32)),
                             rtol=1e-4, atol=1e-5)
  g = nnx.grad(lambda m: jnp.sum(m(x, is_causal=True) ** 2))(layer)
  for name in ("conv_q", "conv_k", "conv_v", "rel_embeddings"):
    assert float(jnp.max(jnp.abs(getattr(g, name).value))) > 0, name
