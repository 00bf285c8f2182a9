"""Key-driven GQA: the allocation vs the authors' loop (NumPy), attention vs a
float64 NumPy per-head softmax with that grouping; four patterns, masks,
masked-slot invariance, grads, bf16, vmap (group_over='example'), errors,
the layer."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

# the module (attnjax.sequence.key_driven_gqa is the function of that name)
kd = importlib.import_module("attnjax.sequence.key_driven_gqa")

B, T, S, N, K, H, HV = 2, 7, 5, 6, 3, 4, 3


def _np_alloc(norms, n, minmax=True):
  norms = np.asarray(norms, np.float64)
  if minmax:
    span = norms.max() - norms.min()
    norms = (norms - norms.min()) / span if span > 0 else np.ones_like(norms)
  a = np.round(norms / norms.sum() * n).astype(int)
  while a.sum() > n:
    a[np.argmax(a)] -= 1
  while a.sum() < n:
    a[np.argmin(a)] += 1
  return a


def _np_attention(q, k, v, alloc, keep=None, causal=False):
  """float64; alloc [B, K]; keep [B, S] key padding."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, h = q.shape
  s = k.shape[1]
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    heads = np.repeat(np.arange(k.shape[2]), alloc[bi])
    for hh in range(n):
      e = q[bi, :, hh] @ k[bi, :, heads[hh]].T / np.sqrt(h)
      ok = np.ones((t, s), bool)
      if keep is not None:
        ok &= np.asarray(keep[bi])[None, :]
      if causal:
        ok &= np.arange(s)[None, :] <= np.arange(t)[:, None]
      e = np.where(ok, e, -np.inf)
      for ti in range(t):
        if ok[ti].any():
          p = np.exp(e[ti] - e[ti].max())
          out[bi, ti, hh] = p / p.sum() @ v[bi, :, heads[hh]]
  return out


def _data(s=T, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  # key heads of clearly different scales -> an uneven allocation
  scale = jnp.array([0.3, 1.0, 3.0])[None, None, :, None]
  return (jax.random.normal(ks[0], (B, T, N, H), dtype),
          (jax.random.normal(ks[1], (B, s, K, H)) * scale).astype(dtype),
          jax.random.normal(ks[2], (B, s, K, HV), dtype))


def test_allocation_matches_authors_loop():
  rng = np.random.default_rng(0)
  f = jax.jit(kd.allocate_query_heads, static_argnames=("num_heads",
                                                         "minmax"))
  for trial in range(40):
    kh = int(rng.integers(1, 6))
    n = kh * int(rng.integers(1, 5))
    norms = rng.gamma(2.0, size=kh)
    if trial % 7 == 0:
      norms[:] = 1.5                      # degenerate: uniform allocation
    for minmax in (True, False):
      got = np.asarray(f(norms, num_heads=n, minmax=minmax))
      np.testing.assert_array_equal(got, _np_alloc(norms, n, minmax))
      assert got.sum() == n
  np.testing.assert_array_equal(kd.allocate_query_heads([1., 2., 4.], 8),
                                [0, 2, 6])
  np.testing.assert_array_equal(
      kd.key_driven_head_groups(jnp.array([0, 2, 6]), 8), [1, 1, 2, 2, 2, 2, 2, 2])


@pytest.mark.parametrize("s", [T, S], ids=["self", "cross"])
def test_four_patterns_vs_float64(s):
  q, k, v = _data(s=s)
  f = jax.jit(functools.partial(kd.key_driven_gqa, return_allocation=True),
              static_argnames="is_causal")
  for causal in (False, True):
    got, alloc = f(q, k, v, is_causal=causal)
    want_alloc = _np_alloc(np.sqrt((np.asarray(k, np.float64) ** 2).sum(
        (1, 3))).sum(0), N)
    np.testing.assert_array_equal(alloc, want_alloc)
    assert len(set(want_alloc.tolist())) > 1        # genuinely uneven
    want = _np_attention(q, k, v, [want_alloc] * B, causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        kd.key_driven_gqa_reference(q, k, v, is_causal=causal), want,
        rtol=1e-5, atol=1e-5)


def test_masks_invariance_and_grads():
  q, k, v = _data(seed=1)
  keep = jnp.arange(T)[None, :] < jnp.array([5, 0])[:, None]
  mask = keep[:, None, None, :]
  c = jax.random.normal(jax.random.key(3), (B, T, N, HV))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v, mask=mask, is_causal=True) * c)

  g = jax.jit(jax.value_and_grad(functools.partial(loss, kd.key_driven_gqa),
                                 argnums=(0, 1, 2)))
  val, g1 = g(q, k, v)
  out = kd.key_driven_gqa(q, k, v, mask=mask, is_causal=True)
  nrm = np.sqrt((np.where(np.asarray(keep)[:, :, None, None],
                          np.asarray(k, np.float64), 0) ** 2).sum((1, 3)))
  want = _np_attention(q, k, v, [_np_alloc(nrm.sum(0), N)] * B,
                       keep=keep, causal=True)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[1], 0.0)
  g2 = jax.grad(functools.partial(loss, kd.key_driven_gqa_reference),
                argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for poison in (np.nan, np.inf, -np.inf):
    kp = jnp.where(keep[:, :, None, None], k, poison)
    vp = jnp.where(keep[:, :, None, None], v, poison)
    val2, g3 = g(q, kp, vp)
    np.testing.assert_array_equal(val2, val)
    for a, b in zip(g3, g1):
      np.testing.assert_array_equal(a, b)


def test_bf16_vmap_per_example_and_dgqa_norms():
  q, k, v = _data(seed=2)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = kd.key_driven_gqa(bf(q), bf(k), bf(v), is_causal=True)
  assert got.dtype == jnp.bfloat16
  ref = kd.key_driven_gqa(*(bf(x).astype(jnp.float32) for x in (q, k, v)),
                          is_causal=True)
  np.testing.assert_allclose(got.astype(jnp.float32), ref, atol=3e-2,
                             rtol=3e-2)
  per = functools.partial(kd.key_driven_gqa, group_over="example")
  np.testing.assert_allclose(jax.vmap(per)(q, k, v), per(q, k, v), rtol=1e-6,
                             atol=1e-6)
  # DGQA: allocation from a caller's statistic (here: head 0 dominant)
  ema = kd.ema_key_norms(jnp.array([9.0, 1.0, 1.0]), jnp.array([8., 1., 1.]))
  out, alloc = kd.key_driven_gqa(q, k, v, norms=ema, minmax=False,
                                 return_allocation=True)
  np.testing.assert_array_equal(alloc, _np_alloc(np.asarray(ema), N, False))
  np.testing.assert_allclose(out, _np_attention(q, k, v, [alloc] * B),
                             rtol=1e-5, atol=1e-5)


def test_value_errors_and_layer():
  q, k, v = _data()
  with pytest.raises(ValueError, match=r"`norms`.*\[3\].*\(2,\)"):
    kd.key_driven_gqa(q, k, v, norms=jnp.ones(2))
  with pytest.raises(ValueError, match="group_over"):
    kd.key_driven_gqa(q, k, v, group_over="head")
  with pytest.raises(ValueError, match="head_dim"):
    kd.key_driven_gqa(q, k[..., :3], v)
  with pytest.raises(ValueError, match="mask"):
    kd.key_driven_gqa(q, k, v, mask=jnp.ones((3, T), bool))
  layer = kd.KeyDrivenGQAttention(N, 8, num_kv_heads=K, head_dim=H,
                                  rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (B, T, 8))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  qq, kk, vv = layer.project_qkv(x)
  nrm = np.sqrt((np.asarray(kk, np.float64) ** 2).sum((1, 3))).sum(0)
  want = layer.out(jnp.asarray(_np_attention(
      qq, kk, vv, [_np_alloc(nrm, N)] * B, causal=True), jnp.float32))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
