"""Budgeted attention-guided token selection on hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as an


def test_allocate_budget():
  np.testing.assert_array_equal(an.allocate_budget([3, 1], [10, 10], 8), [6, 2])
  # shares 7.2 / 0.8 -> 7 / 1; the first is capped at 3, the rest moves over
  np.testing.assert_array_equal(an.allocate_budget([9, 1], [3, 10], 8), [3, 5])
  # budget larger than the tokens: everything
  np.testing.assert_array_equal(an.allocate_budget([1, 1], [2, 3], 10), [2, 3])
  # zero importance everywhere: split by free room
  assert an.allocate_budget([0, 0], [2, 6], 4).sum() == 4
  with pytest.raises(ValueError, match="importance"):
    an.allocate_budget([1, -1], [2, 2], 2)


def test_select_tokens():
  s = np.array([[0.1, 0.5, 0.2, 0.9, 0.3, 0.05]])
  np.testing.assert_array_equal(an.select_tokens(s, 3), [[1, 3, 4]])
  parts = [0, 0, 0, 1, 1, 1]
  np.testing.assert_array_equal(
      an.select_tokens(s, 4, parts, importance=np.array([[1.0, 1.0]])),
      [[1, 2, 3, 4]])
  # importance 3:1 -> 3 tokens from partition 0, 1 from partition 1
  np.testing.assert_array_equal(
      an.select_tokens(s, 4, parts, importance=np.array([[3.0, 1.0]])),
      [[0, 1, 2, 3]])
  with pytest.raises(ValueError, match="importance"):
    an.select_tokens(s, 4, parts, importance=np.ones((1, 3)))


def test_cls_attention_and_drop():
  m = jnp.asarray([[[[0.1, 0.6, 0.3], [0, 1, 0], [0, 0, 1]],
                    [[0.3, 0.2, 0.5], [0, 1, 0], [0, 0, 1]]]])   # [1, 2, 3, 3]
  np.testing.assert_allclose(an.cls_attention(m), [[0.4, 0.4]], atol=1e-6)
  tok = jnp.arange(12.0).reshape(1, 4, 3)
  np.testing.assert_array_equal(an.drop_tokens(tok, [[0, 2]]),
                                [[[0, 1, 2], [6, 7, 8]]])
