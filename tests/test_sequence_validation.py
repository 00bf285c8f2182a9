"""Issue 15 (families side), sequence family: block_sparse_attention's
max_blocks_per_row no longer drops blocks silently; NumPy integer scalars are
accepted wherever a Python int is; moh_gates names the right argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import sequence as sq

B, T, N, H = 1, 12, 2, 8


def _qkv(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (B, T, N, H), jnp.float32) for k in ks)


LAYOUT = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]], bool)   # densest row: 3


def test_block_sparse_refuses_too_small_max_blocks_per_row():
  q, k, v = _qkv()
  for kk in (1, 2):
    with pytest.raises(ValueError, match="max_blocks_per_row"):
      sq.block_sparse_attention(q, k, v, LAYOUT, 4, max_blocks_per_row=kk)


def test_block_sparse_max_blocks_per_row_sufficient_matches_reference():
  q, k, v = _qkv(1)
  want = sq.block_sparse_attention_reference(q, k, v, LAYOUT, 4)
  for kk in (None, 3, np.int64(3), 5):
    got = sq.block_sparse_attention(q, k, v, LAYOUT, 4, max_blocks_per_row=kk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Traced layout: the bound is the caller's promise (documented).
  f = jax.jit(lambda lay: sq.block_sparse_attention(q, k, v, lay, 4,
                                                    max_blocks_per_row=3))
  np.testing.assert_allclose(f(jnp.asarray(LAYOUT)), want, rtol=1e-5,
                             atol=1e-5)


def test_numpy_integer_scalars_accepted():
  q, k, v = _qkv(2)
  i64 = np.int64
  pairs = [
      (lambda c: sq.moba_attention(q, k, v, block_size=c(4), top_k=c(2))),
      (lambda c: sq.routing_attention(q, k, v, region_size=c(4), top_k=c(2))),
      (lambda c: sq.agent_attention(q, k, v, num_agents=c(3))),
      (lambda c: sq.sliding_window_attention(q, k, v, c(3),
                                             block_size=c(4))),
      (lambda c: sq.block_sparse_attention(q, k, v, LAYOUT, c(4))),
      (lambda c: sq.linear_attention(q, k, v, is_causal=True,
                                     chunk_size=c(4))),
      (lambda c: sq.triplewise_attention(q, k, v, k, v, query_chunk=c(4),
                                         key_chunk=c(4))),
  ]
  for f in pairs:
    np.testing.assert_array_equal(np.asarray(f(i64)), np.asarray(f(int)))
  proj = sq.orthogonal_random_features(jax.random.key(0), i64(8), i64(H))
  assert proj.shape == (8, H)


def test_bools_and_floats_refused_as_ints():
  q, k, v = _qkv()
  for bad in (True, 4.0, 0, -2):
    with pytest.raises(ValueError, match="block_size"):
      sq.moba_attention(q, k, v, block_size=bad)


def test_moh_gates_names_router_logits():
  with pytest.raises(ValueError, match="router_logits"):
    sq.moh_gates(jnp.zeros((3, 1)), num_shared_heads=0, num_active_heads=1)
  with pytest.raises(ValueError, match="num_active_heads"):
    sq.moh_gates(jnp.zeros((3, 6)), num_shared_heads=1, num_active_heads=5)
