"""attnjax family functions with implementation='pallas' (the kernels in
pallas_kernels, interpret mode on CPU) against their XLA implementations and
references: values (float32, bfloat16) and gradients, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.sequence import sparse as seq_sparse
from attnjax.sequence.linear import linear_attention, linear_attention_reference
from attnjax.spatial.neighborhood import (neighborhood_attention,
                                          neighborhood_attention_reference)


def _rand(rng, shape, dtype=jnp.float32):
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _out_and_grads(f, args):
  """jit: f(*args) and the gradients of sum(sin(f(*args))) w.r.t. all args,
  one compiled program (vjp of cos(out))."""
  def run(*a):
    out, pull = jax.vjp(f, *a)
    return out, pull(jnp.cos(out))
  return jax.jit(run)(*args)


def _check(fn_pallas, fn_ref, args, *, dtype, atol, gtol=1e-4):
  # float32: values and gradients of each side from one compile (the
  # reference used to run eagerly, forward and backward).
  if dtype == jnp.float32:
    (out, got), (ref, want) = (_out_and_grads(f, args)
                               for f in (fn_pallas, fn_ref))
  else:
    out = jax.jit(fn_pallas)(*args)
    ref = jax.jit(fn_ref)(*(a.astype(jnp.float32) for a in args))
  assert out.dtype == dtype and out.shape == ref.shape
  # Tolerances relative to the output's scale (unnormalized linear attention
  # reaches |out| ~ 100; float32 sums then differ by ~1e-5 of that).
  mag = max(1.0, float(jnp.max(jnp.abs(ref))))
  np.testing.assert_allclose(np.asarray(out, np.float32), ref,
                             atol=atol * mag, rtol=atol)
  if dtype != jnp.float32:
    return
  for g, w in zip(got, want):
    gmag = max(1.0, float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(g, w, atol=gtol * gmag, rtol=gtol)


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("nd,causal", [(1, False), (2, False), (2, True)])
def test_neighborhood(dtype, nd, causal):
  rng = np.random.default_rng(nd)
  spatial = (37,) if nd == 1 else (13, 11)
  ks, dl = (5,) if nd == 1 else (3, 5), (2,) if nd == 1 else (2, 1)
  q = _rand(rng, (2,) + spatial + (4, 8), dtype)
  k = _rand(rng, (2,) + spatial + (2, 8), dtype)
  v = _rand(rng, (2,) + spatial + (2, 8), dtype)
  kw = dict(dilation=dl, is_causal=causal)
  _check(lambda q, k, v: neighborhood_attention(q, k, v, ks,
                                                implementation="pallas", **kw),
         lambda q, k, v: neighborhood_attention_reference(q, k, v, ks, **kw),
         (q, k, v), dtype=dtype, atol=TOL[dtype])


def test_neighborhood_layer_and_refusals():
  from flax import nnx
  rng = np.random.default_rng(0)
  x = _rand(rng, (1, 9, 10, 16))
  a = attnjax.spatial.NeighborhoodAttention(16, 2, 3, use_rpb=False,
                                            rngs=nnx.Rngs(0))
  b = attnjax.spatial.NeighborhoodAttention(16, 2, 3, use_rpb=False,
                                            implementation="pallas",
                                            rngs=nnx.Rngs(0))
  np.testing.assert_allclose(b(x), a(x), atol=2e-5)
  q = _rand(rng, (1, 9, 10, 2, 8))
  with pytest.raises(NotImplementedError, match="rpb"):
    neighborhood_attention(q, q, q, 3, rpb=jnp.zeros((2, 5, 5)),
                           implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    neighborhood_attention(q, q, q, 3, implementation="cuda")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window(dtype, causal):
  rng = np.random.default_rng(3)
  q = _rand(rng, (2, 70, 4, 16), dtype)
  k = _rand(rng, (2, 70, 2, 16), dtype)
  v = _rand(rng, (2, 70, 2, 16), dtype)
  mask = jnp.asarray(rng.random((2, 1, 1, 70)) < 0.9)
  _check(lambda q, k, v: seq_sparse.sliding_window_attention(
             q, k, v, (9, 4), is_causal=causal, mask=mask, block_size=16,
             implementation="pallas"),
         lambda q, k, v: seq_sparse.sliding_window_attention_reference(
             q, k, v, (9, 4), is_causal=causal, mask=mask),
         (q, k, v), dtype=dtype, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_sparse_per_example_layout(dtype):
  rng = np.random.default_rng(4)
  q = _rand(rng, (2, 50, 2, 16), dtype)
  k = _rand(rng, (2, 60, 2, 16), dtype)
  v = _rand(rng, (2, 60, 2, 16), dtype)
  layout = jnp.asarray(rng.random((2, 2, 4, 4)) < 0.5)   # [B, N, nq, nk]
  _check(lambda q, k, v: seq_sparse.block_sparse_attention(
             q, k, v, layout, (16, 16), is_causal=False,
             implementation="pallas"),
         lambda q, k, v: seq_sparse.block_sparse_attention_reference(
             q, k, v, layout, (16, 16)),
         (q, k, v), dtype=dtype, atol=TOL[dtype])


def test_block_sparse_matches_xla_implementation_and_vmaps():
  rng = np.random.default_rng(5)
  q = _rand(rng, (3, 64, 2, 8))
  layout = jnp.tril(jnp.ones((4, 4), bool))
  f = lambda impl: (lambda q: seq_sparse.block_sparse_attention(
      q, q, q, layout, 16, is_causal=True, implementation=impl))
  np.testing.assert_allclose(f("pallas")(q), f("xla")(q), atol=2e-5)
  # vmap over an extra leading axis (unbatched calls inside).
  np.testing.assert_allclose(jax.vmap(f("pallas"))(q), f("xla")(q),
                             atol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_causal_linear(dtype, normalize):
  rng = np.random.default_rng(6)
  q = _rand(rng, (2, 45, 4, 8), dtype)
  k = _rand(rng, (2, 45, 2, 8), dtype)
  v = _rand(rng, (2, 45, 2, 8), dtype)
  mask = jnp.asarray(rng.random((2, 45)) < 0.8)[:, None, None, :]
  kw = dict(is_causal=True, normalize=normalize, scale=0.5, mask=mask)
  _check(lambda q, k, v: linear_attention(q, k, v, chunk_size=16,
                                          implementation="pallas", **kw),
         lambda q, k, v: linear_attention(q, k, v, **kw),
         (q, k, v), dtype=dtype, atol=5e-5 if dtype == jnp.float32 else 5e-2,
         gtol=2e-4)
  # and the quadratic reference
  np.testing.assert_allclose(
      linear_attention(q, k, v, implementation="pallas", **kw)
      .astype(jnp.float32),
      linear_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                 v.astype(jnp.float32), **kw),
      atol=(5e-5 if dtype == jnp.float32 else 5e-2) * (1 if normalize else 100),
      rtol=1e-3)


def test_linear_refusals():
  q = jnp.ones((1, 8, 2, 4))
  with pytest.raises(NotImplementedError, match="causal kernel"):
    linear_attention(q, q, q, implementation="pallas")
  k = jnp.ones((1, 6, 2, 4))
  with pytest.raises(NotImplementedError, match="q_len == kv_len"):
    linear_attention(q, k, k, is_causal=True, implementation="pallas")
