"""Mixture-of-Head gates / loss / layer, triple-wise attention (exact O(n^3)
vs chunked, memory), and MultiHeadAttention's decoupled head size."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import sequence as sq
from experiments import bench_utils


@pytest.mark.parametrize("shared,active", [(2, 5), (0, 3), (3, 3), (0, 8)])
def test_moh_gates_match_reference(shared, active):
  logits = 2.0 * jax.random.normal(jax.random.key(shared * 10 + active),
                                   (3, 7, 8 + 2))
  g, loss = sq.moh_gates(logits, num_shared_heads=shared,
                         num_active_heads=active)
  gr, lr = sq.moh_gates_reference(logits, num_shared_heads=shared,
                                  num_active_heads=active)
  np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), lr, rtol=1e-5, atol=1e-7)
  # Exactly num_active_heads heads are on for every token.
  assert np.all(np.sum(np.asarray(g) > 0, -1) == active)
  # Routed weights are a_2 * softmax over *all* routed heads (the paper's
  # form), so the total is 1 only when no routed head is dropped.
  total = np.sum(np.asarray(g), -1)
  assert np.all(total <= 1.0 + 1e-5)
  if active in (shared, 8):
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
  else:
    assert np.all(total < 1.0)


def test_moh_load_balance_loss_balanced_vs_collapsed():
  hs, hr, k = 2, 6, 2
  t = 6 * 10
  # Balanced: token t prefers routed heads (t, t+1) mod 6 equally.
  logits = np.zeros((t, hs + hr + 2), np.float32)
  for i in range(t):
    logits[i, hs + (i % hr)] = 5.0
    logits[i, hs + ((i + 1) % hr)] = 5.0
  _, balanced = sq.moh_gates(jnp.asarray(logits), num_shared_heads=hs,
                             num_active_heads=hs + k)
  collapsed_logits = np.zeros_like(logits)
  collapsed_logits[:, hs:hs + 2] = 5.0
  _, collapsed = sq.moh_gates(jnp.asarray(collapsed_logits),
                              num_shared_heads=hs, num_active_heads=hs + k)
  assert float(collapsed) > 2.5 * float(balanced)
  # Balanced routing gives about k / n_routed.
  np.testing.assert_allclose(float(balanced), k / hr, rtol=0.05)
  # The loss trains the router: its gradient is non-zero.
  grad = jax.grad(lambda z: sq.moh_gates(z, num_shared_heads=hs,
                                          num_active_heads=hs + k)[1])(
                                              jnp.asarray(collapsed_logits))
  assert float(jnp.max(jnp.abs(grad))) > 0


def test_moh_errors():
  z = jnp.zeros((2, 6))
  with pytest.raises(ValueError, match="num_active_heads"):
    sq.moh_gates(z, num_shared_heads=2, num_active_heads=1)
  with pytest.raises(ValueError, match="num_shared_heads"):
    sq.moh_gates(z, num_shared_heads=5, num_active_heads=5)
  with pytest.raises(ValueError, match="gates"):
    sq.mixture_of_heads_attention(jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 4, 8)),
                                  jnp.ones((1, 3, 4, 8)), jnp.ones((1, 3, 2)))


def test_moh_layer_is_weighted_sum_of_heads():
  layer = sq.MoHAttention(4, 16, head_dim=8, num_shared_heads=1,
                          num_active_heads=3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 10, 16))
  y, aux = layer(x, is_causal=True, return_aux=True)
  assert aux["gates"].shape == (2, 10, 4)
  assert np.all(np.sum(np.asarray(aux["gates"]) > 0, -1) == 3)
  q, k, v = layer.project_qkv(x)
  heads = attnjax.dot_product_attention(q, k, v, is_causal=True)
  wo = layer.out.kernel[...]                              # [N, H, out]
  want = jnp.einsum("btn,btnh,nho->bto", aux["gates"], heads, wo)
  want = want + layer.out.bias[...]
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  # Sown loss, trainable router, usable as a drop-in (returns y only).
  y2 = layer(x)
  assert y2.shape == (2, 10, 16)
  sown = nnx.pop(layer, nnx.Intermediate)
  assert "load_balance_loss" in jax.tree_util.keystr(
      jax.tree_util.tree_flatten_with_path(sown)[0][0][0])

  def loss_fn(m):
    y, aux = m(x, return_aux=True)
    return jnp.mean(y ** 2) + 0.01 * aux["load_balance_loss"]

  grads = nnx.grad(loss_fn)(layer)
  assert float(jnp.max(jnp.abs(grads.router.kernel[...]))) > 0


@pytest.mark.parametrize("causal", [False, True])
def test_triplewise_chunked_matches_numpy_cubic(causal):
  ks = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(ks[0], (1, 7, 2, 4))
  k1 = jax.random.normal(ks[1], (1, 7, 1, 4))
  v1 = jax.random.normal(ks[2], (1, 7, 1, 3))
  k2 = jax.random.normal(ks[3], (1, 7, 1, 4))
  v2 = jax.random.normal(ks[4], (1, 7, 1, 3))
  qn, k1n, v1n, k2n, v2n = (np.asarray(a, np.float64) for a in
                            (q, k1, v1, k2, v2))
  want = np.zeros((1, 7, 2, 3))
  for n in range(2):
    for i in range(7):
      sc = np.einsum("d,jd,ld->jl", qn[0, i, n], k1n[0, :, 0], k2n[0, :, 0]) / 2
      if causal:
        sc[i + 1:, :] = -np.inf
        sc[:, i + 1:] = -np.inf
      p = np.exp(sc - sc.max())
      p /= p.sum()
      want[0, i, n] = np.einsum("jl,jd,ld->d", p, v1n[0, :, 0], v2n[0, :, 0])
  for fn in (sq.triplewise_attention_reference,
             functools.partial(sq.triplewise_attention, query_chunk=3,
                               key_chunk=2)):
    np.testing.assert_allclose(fn(q, k1, v1, k2, v2, is_causal=causal), want,
                               rtol=1e-5, atol=1e-5)


def test_triplewise_memory_is_bounded_by_chunking():
  s = 96
  x = jnp.ones((1, s, 2, 16))
  exact = bench_utils.peak_memory_bytes(
      lambda q, k, v: sq.triplewise_attention_reference(q, k, v, k, v), x, x, x)
  chunked = bench_utils.peak_memory_bytes(
      lambda q, k, v: sq.triplewise_attention(q, k, v, k, v, query_chunk=16,
                                              key_chunk=16), x, x, x)
  # Exact materializes [N, T, S, S] float32 scores (~7 MiB here).
  assert exact > 2 * 96 ** 3 * 4
  assert chunked < exact / 4, (chunked, exact)


def test_triplewise_layer():
  layer = sq.TriplewiseAttention(2, 8, head_dim=4, query_chunk=4, key_chunk=4,
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 9, 8))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  assert y.shape == (2, 9, 8)
  y2 = layer(x.at[:, 6:].set(2.0), is_causal=True)
  np.testing.assert_allclose(y2[:, :6], y[:, :6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads", [2, 8])
def test_decoupled_head_dim_removes_low_rank_bottleneck(num_heads):
  width, p = 16, 16
  fixed = attnjax.MultiHeadAttention(num_heads, width, head_dim=p,
                                     rngs=nnx.Rngs(0))
  default = attnjax.MultiHeadAttention(num_heads, width, rngs=nnx.Rngs(0))
  assert fixed.query.kernel[...].shape == (width, num_heads, p)
  assert default.head_dim == width // num_heads
  kq_fixed, _ = fixed.merged_matrices()
  kq_default, _ = default.merged_matrices()
  rank = lambda m: int(np.linalg.matrix_rank(np.asarray(m[0]), tol=1e-5))
  assert rank(kq_fixed) == min(width, p)
  assert rank(kq_default) == width // num_heads
  x = jax.random.normal(jax.random.key(0), (2, 5, width))
  assert fixed(x).shape == (2, 5, width)
  # Also with a sequence-family layer.
  lin = sq.LinearAttention(num_heads, width, head_dim=p, rngs=nnx.Rngs(0))
  assert lin.query.kernel[...].shape == (width, num_heads, p)
  assert lin(x, is_causal=True).shape == (2, 5, width)
