"""Block-sparse flash attention (interpret mode on CPU) vs its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import block_sparse as bsa
from pallas_kernels import flash as fa


def _rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1.0)


@pytest.mark.parametrize("dtype,heads_major", [(jnp.float32, True),
                                               (jnp.bfloat16, False)])
def test_values_and_grads_vs_reference(dtype, heads_major):
  b, t, s, n, kh, h, bq, bk = 1, 30, 37, 4, 2, 16, 8, 8
  nq, nk = -(-t // bq), -(-s // bk)
  rng = np.random.default_rng(0)
  layout = rng.random((n, nq, nk)) < 0.4
  layout[1, 2, :] = False                  # an empty query tile -> zeros
  layout[0, 0, 0] = True
  q, k, v = (_rand(1, (b, t, n, h), dtype), _rand(2, (b, s, kh, h), dtype),
             _rand(3, (b, s, kh, h), dtype))
  kw = dict(block_q=bq, block_kv=bk, is_causal=True)
  dout = _rand(4, (b, t, n, h))
  f32 = lambda x: x.astype(jnp.float32)

  def loss(fn, **extra):
    return lambda q, k, v: jnp.sum(
        fn(q, k, v, layout, **kw, **extra).astype(jnp.float32) * dout)

  out = jax.jit(lambda q, k, v: bsa.block_sparse_attention(
      q, k, v, layout, heads_major=heads_major, **kw))(q, k, v)
  ref = bsa.block_sparse_attention_reference(f32(q), f32(k), f32(v), layout,
                                             **kw)
  tol = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=tol,
                             rtol=tol)
  assert np.all(np.asarray(out[:, 16:24, 1], np.float32) == 0.0)
  g = jax.jit(jax.grad(loss(bsa.block_sparse_attention,
                            heads_major=heads_major), (0, 1, 2)))(q, k, v)
  gr = jax.jit(jax.grad(loss(bsa.block_sparse_attention_reference),
                       (0, 1, 2)))(f32(q), f32(k), f32(v))
  gtol = 1e-4 if dtype == jnp.float32 else 5e-2
  for a, r in zip(g, gr):
    assert a.dtype == dtype
    assert np.all(np.isfinite(np.asarray(a, np.float32)))
    assert _rel(a, r) < gtol


def test_empty_tiles_are_skipped_and_traced_layout():
  # NaNs planted in key/value tiles the layout excludes never reach the
  # output: those tiles are not computed-and-masked but skipped. The layout
  # is a traced argument of the jitted function (router-style).
  t = s = 32
  bq = bk = 8
  q, k, v = _rand(5, (1, t, 2, 16)), _rand(6, (1, s, 2, 16)), _rand(
      7, (1, s, 2, 16))
  layout = bsa.local_block_layout(4, 4, bq, bk, 8, 0)   # diagonal + 1 below
  assert bsa.visited_fraction(layout) == 7 / 16
  v_nan = v.at[:, 24:].set(jnp.nan)   # last key tile: only query tile 3 sees it
  f = jax.jit(lambda q, k, v, lay: bsa.block_sparse_attention(
      q, k, v, lay, block_q=bq, block_kv=bk))
  out = f(q, k, v_nan, jnp.asarray(layout))
  ref = bsa.block_sparse_attention_reference(q, k, v, layout, block_q=bq,
                                             block_kv=bk)
  np.testing.assert_allclose(out[:, :24], ref[:, :24], atol=1e-5, rtol=1e-5)
  # A causal layout + is_causal equals dense causal flash attention.
  lay = bsa.causal_block_layout(4, 4, bq, bk)
  out = f(q, k, v, jnp.asarray(lay))
  np.testing.assert_allclose(
      out, bsa.block_sparse_attention_reference(q, k, v, lay, block_q=bq,
                                                block_kv=bk),
      atol=1e-5, rtol=1e-5)
  out_c = bsa.block_sparse_attention(q, k, v, lay, block_q=bq, block_kv=bk,
                                     is_causal=True)
  np.testing.assert_allclose(out_c, fa.mha_reference(q, k, v, is_causal=True),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(bsa.layout_from_mask(jnp.tril(jnp.ones((t, s), bool)), bq, bk)),
      lay)


def test_layout_value_errors():
  q = jnp.zeros((1, 16, 2, 8))
  with pytest.raises(ValueError, match="block_layout"):
    bsa.block_sparse_attention(q, q, q, np.ones((3, 2), bool), block_q=8,
                               block_kv=8)
  with pytest.raises(ValueError, match="block_q"):
    bsa.block_sparse_attention(q, q, q, np.ones((2, 2), bool), block_q=0,
                               block_kv=8)


def _out_and_grads(fn, dphi):
  """jit: fn(q, k, v) and the gradients of sum(phi(fn(q, k, v))) w.r.t.
  q, k, v (dphi = phi'), from one compiled program (was eager: each kernel
  and op compiled on its own)."""
  def run(q, k, v):
    out, pull = jax.vjp(fn, q, k, v)
    return out, pull(dphi(out))
  return jax.jit(run)


def test_gpu_subtile_split_is_exact(monkeypatch):
  # On GPU, 128x128 layout tiles at head_dim 256 are split into 32x32
  # kernel tiles; run that path (forced, interpret mode) against the
  # reference, including a ragged tail and per-head layouts.
  monkeypatch.setattr(bsa, "_split_tiles", lambda interpret: True)
  monkeypatch.setattr(bsa, "target_platform", lambda: "gpu")
  assert bsa._split_factor(128, 32) == 4 and bsa._split_factor(96, 32) == 4
  assert bsa._split_factor(48, 32) == 2 and bsa._split_factor(40, 32) == 2
  assert bsa._split_factor(33, 32) == 1 and bsa._split_factor(32, 32) == 1
  rng = np.random.default_rng(3)
  t, n, h = 200, 2, 256
  q, k, v = (jnp.asarray(rng.standard_normal((1, t, n, h)), jnp.float32)
             for _ in range(3))
  lay = jnp.asarray(rng.random((n, 2, 2)) < 0.6).at[:, :, 0].set(True)
  f = lambda q, k, v: bsa.block_sparse_attention(q, k, v, lay, block_q=128,
                                                block_kv=128, interpret=True)
  r = lambda q, k, v: bsa.block_sparse_attention_reference(
      q, k, v, lay, block_q=128, block_kv=128)
  # values and the gradients of sum(out ** 2), each side one compile
  (out, g), (want, gr) = (_out_and_grads(fn, lambda o: 2 * o)(q, k, v)
                          for fn in (f, r))
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_batch_dependent_layout():
  # Routed layouts differ per example and head: [B, N, nq, nk].
  rng = np.random.default_rng(9)
  b, t, n, h = 2, 72, 2, 16
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
             for _ in range(3))
  lay = jnp.asarray(rng.random((b, n, 3, 3)) < 0.5).at[..., 0].set(True)
  lay = lay.at[1, 0].set(False)          # example 1, head 0 visits nothing
  f = lambda q, k, v: bsa.block_sparse_attention(
      q, k, v, lay, block_q=32, block_kv=32, interpret=True)
  r = lambda q, k, v: bsa.block_sparse_attention_reference(
      q, k, v, lay, block_q=32, block_kv=32)
  # values and the gradients of sum(sin(out)), each side one compile
  (out, g), (want, gr) = (_out_and_grads(fn, jnp.cos)(q, k, v)
                          for fn in (f, r))
  np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
  assert np.all(np.asarray(out[1, :, 0]) == 0)
  for a, w in zip(g, gr):
    np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match="block_layout"):
    bsa.block_sparse_attention(q, k, v, jnp.ones((3, n, 3, 3), bool),
                               block_q=32, block_kv=32)
