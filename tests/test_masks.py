"""attnjax.masks vs definitions written out with NumPy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import masks as M


def test_causal_and_offset():
  m = np.asarray(M.causal_mask(4, 6))
  ref = np.array([[j <= i for j in range(6)] for i in range(4)])
  np.testing.assert_array_equal(m, ref)
  m = np.asarray(M.causal_mask(4, 6, offset=2))   # bottom-right aligned
  ref = np.array([[j <= i + 2 for j in range(6)] for i in range(4)])
  np.testing.assert_array_equal(m, ref)


@pytest.mark.parametrize("window", [2, (3, 0), (0, 2)])
def test_local_window(window):
  left, right = (window, window) if isinstance(window, int) else window
  m = np.asarray(M.local_window_mask(7, 9, window))
  ref = np.array([[i - left <= j <= i + right for j in range(9)]
                  for i in range(7)])
  np.testing.assert_array_equal(m, ref)


def test_padding_and_segments():
  m = np.asarray(M.padding_mask(3, 4, q_lengths=jnp.array([3, 1]),
                                kv_lengths=jnp.array([2, 4])))
  assert m.shape == (2, 1, 3, 4)
  for b, (ql, kl) in enumerate([(3, 2), (1, 4)]):
    ref = np.array([[i < ql and j < kl for j in range(4)] for i in range(3)])
    np.testing.assert_array_equal(m[b, 0], ref)
  qs = jnp.array([[0, 0, 1]])
  ks = jnp.array([[0, 1, 1, 2]])
  m = np.asarray(M.segment_mask(qs, ks))
  ref = np.array([[int(qs[0, i]) == int(ks[0, j]) for j in range(4)]
                  for i in range(3)])
  np.testing.assert_array_equal(m[0, 0], ref)


def test_block_mask_ragged():
  layout = np.array([[1, 0], [1, 1]], bool)
  m = np.asarray(M.block_mask(layout, 3, 2, q_len=5, kv_len=3))
  ref = np.array([[layout[i // 3, j // 2] for j in range(3)] for i in range(5)])
  np.testing.assert_array_equal(m, ref)
  with pytest.raises(ValueError, match="layout"):
    M.block_mask(layout, 3, 2, q_len=7, kv_len=3)


def test_combine():
  a = M.causal_mask(4)
  b = M.local_window_mask(4, 4, (1, 1))
  np.testing.assert_array_equal(M.and_masks(a, None, b), np.asarray(a) & np.asarray(b))
  np.testing.assert_array_equal(M.or_masks(a, b), np.asarray(a) | np.asarray(b))
  assert M.and_masks(None) is None
  bias = np.asarray(M.mask_to_bias(a))
  assert np.all(bias[np.asarray(a)] == 0) and np.all(bias[~np.asarray(a)] < -1e30)


def test_bad_arguments():
  with pytest.raises(ValueError, match="local_window_size"):
    M.local_window_mask(3, 3, (-1, 0))
  with pytest.raises(ValueError, match="kv_lengths"):
    M.padding_mask(3, 3, kv_lengths=jnp.ones((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    M.segment_mask(jnp.ones((3,), jnp.int32))
