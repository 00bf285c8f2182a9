"""Adding a backend to an op is one file: tests/softmax/example_backend.py
registers `row_blocks` on `dot_product_attention` by being imported."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import attnjax
from attnjax.softmax import OP



@pytest.fixture
def example():
  mod = importlib.import_module("tests.softmax.example_backend")
  if "row_blocks" not in OP.names():       # unregistered by an earlier test
    mod = importlib.reload(mod)
  mod.BLOCK_COUNTS.clear()
  yield mod
  OP.unregister("row_blocks")


def _inputs():
  ks = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(ks[0], (2, 12, 4, 8))
  k = jax.random.normal(ks[1], (2, 10, 2, 8))       # GQA, S != T
  v = jax.random.normal(ks[2], (2, 10, 2, 6))
  bias = jax.random.normal(ks[3], (1, 4, 12, 10))
  mask = jnp.arange(10)[None, None, None, :] < jnp.array([10, 7])[:, None,
                                                                   None, None]
  return q, k, v, bias, mask


def test_one_file_backend_serves_calls_with_its_config(example):
  q, k, v, bias, mask = _inputs()
  kw = dict(bias=bias, mask=mask, is_causal=True)
  ref, ref_lse = attnjax.dot_product_attention_with_lse(
      q, k, v, implementation="xla", **kw)
  assert "row_blocks" in attnjax.available_implementations()
  out, lse = attnjax.dot_product_attention_with_lse(
      q, k, v, implementation=example.RowBlocks(rows=5), **kw)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(lse, ref_lse, rtol=2e-5, atol=2e-5)
  by_name = attnjax.dot_product_attention(q, k, v, implementation="row_blocks",
                                          **kw)
  np.testing.assert_allclose(by_name, ref, rtol=2e-5, atol=2e-5)
  # The config reached the backend: 12 rows in blocks of 5 -> 3 blocks;
  # the default (16 rows) -> 1.
  assert example.BLOCK_COUNTS == [3, 1]
  # Differentiable like any backend (plain jnp inside).
  g = jax.grad(lambda q: attnjax.dot_product_attention(
      q, k, v, implementation="row_blocks", **kw).sum())(q)
  g_ref = jax.grad(lambda q: attnjax.dot_product_attention(
      q, k, v, implementation="xla", **kw).sum())(q)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


def test_one_file_backend_refusals_and_registry(example):
  q, k, v, _, _ = _inputs()
  kw = dict(dropout_rate=0.5, dropout_rng=jax.random.key(0))
  with pytest.raises(NotImplementedError, match="row_blocks"):
    attnjax.dot_product_attention(q, k, v, implementation="row_blocks", **kw)
  # In a sequence it falls through to the next candidate.
  out = attnjax.dot_product_attention(
      q, k, v, implementation=[example.RowBlocks(), "xla"], **kw)
  np.testing.assert_array_equal(out, attnjax.dot_product_attention(
      q, k, v, implementation="xla", **kw))
  with pytest.raises(ValueError, match="already registered"):
    OP.register("row_blocks", example.row_blocks_attention)
  with pytest.raises(ValueError, match="rows"):
    example.RowBlocks(rows=0)
