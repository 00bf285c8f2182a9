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


# ----------------------------------------------------- argument validation
@pytest.mark.parametrize("call, needle, exc", [
    (lambda: M.padding_mask(3, 4, kv_lengths=jnp.array([1.5, 2.0])),
     "kv_lengths", ValueError),                      # fractional lengths
    (lambda: M.padding_mask(3, 4, q_lengths=np.array([2, -1])),
     "q_lengths", ValueError),                       # negative lengths
    (lambda: M.causal_mask(2.5), "q_len", TypeError),
    (lambda: M.causal_mask(4, -2), "kv_len", ValueError),
    (lambda: M.causal_mask(4, 4, offset=1.5), "offset", TypeError),
    (lambda: M.local_window_mask(4, 4, (2.5, 2.5)), "local_window_size",
     ValueError),                                    # not truncated to 2
    (lambda: M.local_window_mask(4, 4, 1.0), "local_window_size", ValueError),
    (lambda: M.local_window_mask(4, 4, True), "local_window_size", ValueError),
    (lambda: M.block_mask(np.ones((2, 2), bool), 2.0, 2), "block_q",
     TypeError),
])
def test_mask_builders_refuse_bad_arguments(call, needle, exc):
  with pytest.raises(exc, match=needle):
    call()


def test_mask_builders_take_numpy_ints_and_huge_windows():
  m = np.asarray(M.local_window_mask(np.int64(5), np.int32(7),
                                     (np.int64(1), np.int16(2))))
  np.testing.assert_array_equal(m, np.asarray(M.local_window_mask(5, 7,
                                                                  (1, 2))))
  # A window of 2**31 means "everything" and must not overflow int32.
  np.testing.assert_array_equal(np.asarray(M.local_window_mask(5, 7, 2**31)),
                                np.ones((5, 7), bool))
  np.testing.assert_array_equal(
      np.asarray(M.local_window_mask(5, 7, (0, 2**40), offset=2)),
      np.arange(7)[None, :] >= np.arange(5)[:, None] + 2)
  m = np.asarray(M.padding_mask(2, 3, kv_lengths=np.array([0, 3], np.int64)))
  np.testing.assert_array_equal(m[:, 0, 0], [[False] * 3, [True] * 3])


def test_and_or_masks_under_rank_promotion_raise():
  """and_masks/or_masks of rank-2 and rank-4 masks broadcast explicitly, so
  they work under jax_numpy_rank_promotion='raise'."""
  from tests.strict_modes import strict_mode
  a = M.causal_mask(3, 4)
  b = jnp.asarray(np.random.default_rng(0).random((2, 1, 3, 4)) < 0.5)
  with strict_mode("rank_promotion"):
    m_and = M.and_masks(a, None, b)
    m_or = M.or_masks(b, a)
  np.testing.assert_array_equal(m_and, np.asarray(a) & np.asarray(b))
  np.testing.assert_array_equal(m_or, np.asarray(a) | np.asarray(b))
