"""'chunked' forward structure (issue 22 item 4), not timings: without
dropout and with float32 values the row sums of each block come out of the
P V product (V with a ones column), so the compiled forward's block loop
holds no separate sum over the [bq, bk] block (the old body summed P in a
pass of its own: fails on it). Values: the chunked suites
(tests/test_softmax.py -k chunked, tests/softmax/test_chunked_band_split.py).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.softmax import Chunked


def _block_sums(fn, *args):
  txt = jax.jit(fn).lower(*args).compile().as_text()
  return len(re.findall(r'op_name="[^"]*while/body/reduce_sum"', txt))


@pytest.mark.parametrize("is_causal", [False, True])
def test_forward_block_loop_has_no_separate_row_sum(is_causal):
  q = jnp.ones((1, 128, 2, 16), jnp.float32)
  fn = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, is_causal=is_causal, implementation=Chunked(32, 32))
  assert _block_sums(fn, q, q, q) == 0


def test_bf16_values_keep_the_float32_row_sum():
  # 16-bit values would round P before a matmul row sum: the separate
  # float32 sum stays, and the result matches float32 to bf16 precision.
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(x, (1, 96, 2, 16)) for x in ks)
  f = lambda q, k, v: attnjax.dot_product_attention(
      q, k, v, implementation=Chunked(32, 32))
  b16 = lambda x: x.astype(jnp.bfloat16)
  assert _block_sums(f, b16(q), b16(k), b16(v)) > 0
  ref = f(b16(q).astype(jnp.float32), b16(k).astype(jnp.float32),
          b16(v).astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(f(b16(q), b16(k), b16(v)),
                                        np.float32), ref, atol=2e-2)
