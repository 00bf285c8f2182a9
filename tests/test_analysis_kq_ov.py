"""attnjax.analysis.kq_ov on hand-constructed matrices with known values."""

import numpy as np
import pytest

from attnjax.analysis import kq_ov


def test_diagonal_ratio_known_values():
  assert kq_ov.diagonal_ratio(3.0 * np.eye(4)) == pytest.approx(1.0)
  # diag (1, 1), off-diagonal (1, 1): ||diag|| = sqrt2, ||M||_F = 2.
  assert kq_ov.diagonal_ratio(np.ones((2, 2))) == pytest.approx(
      np.sqrt(2) / 2)
  off = np.array([[0.0, 1.0], [2.0, 0.0]])
  assert kq_ov.diagonal_ratio(off) == pytest.approx(0.0)
  batch = np.stack([np.eye(3), np.ones((3, 3))])
  np.testing.assert_allclose(kq_ov.diagonal_ratio(batch),
                             [1.0, np.sqrt(3) / 3])


def test_normalized_diagonal_variance():
  assert kq_ov.normalized_diagonal_variance(-2.0 * np.eye(5)) == \
      pytest.approx(0.0)
  # diag (1, -1): mean 0 -> variance equals mean square -> 1.
  assert kq_ov.normalized_diagonal_variance(np.diag([1.0, -1.0])) == \
      pytest.approx(1.0)
  # diag (1, 3): var = 1, mean square = 5.
  assert kq_ov.normalized_diagonal_variance(np.diag([1.0, 3.0])) == \
      pytest.approx(0.2)
  assert kq_ov.diagonal_mean(np.diag([1.0, 3.0])) == pytest.approx(2.0)


def test_last_entry_ratio_and_zero_sum():
  assert kq_ov.last_entry_ratio(np.array([0.0, 0.0, -2.0])) == \
      pytest.approx(1.0)
  assert kq_ov.last_entry_ratio(np.array([3.0, 4.0])) == pytest.approx(0.8)
  col = np.array([[3.0], [4.0]])
  assert kq_ov.last_entry_ratio(col, axis=-2)[0] == pytest.approx(0.8)
  assert kq_ov.zero_sum_ratio([1.0, -1.0]) == pytest.approx(0.0)
  assert kq_ov.zero_sum_ratio([1.0, 3.0]) == pytest.approx(1.0)
  assert kq_ov.zero_sum_ratio([2.0, -1.0, 100.0], [True, True, False]) == \
      pytest.approx(1.0 / 3.0)
  assert np.isnan(kq_ov.zero_sum_ratio([1.0], [False]))


def test_active_heads_and_selectivity():
  ov = np.zeros((3, 4, 1))
  ov[0, -1, 0] = 1.0
  ov[1, -1, 0] = -0.5
  ov[2, 0, 0] = 0.01
  np.testing.assert_array_equal(kq_ov.active_heads(ov, 0.1),
                                [True, True, False])
  np.testing.assert_allclose(kq_ov.head_norms(ov), [1.0, 0.5, 0.01])
  sel = kq_ov.head_selectivity(np.array([[1.0, 0.0], [1.0, 1.0]]),
                               [[0], [1]])
  np.testing.assert_allclose(sel, [[1.0, 0.0], [0.5, 0.5]])


def test_matrix_cosine():
  a = np.eye(3)
  assert kq_ov.matrix_cosine(a, 2 * a) == pytest.approx(1.0)
  assert kq_ov.matrix_cosine(a, -a) == pytest.approx(-1.0)
  assert kq_ov.matrix_cosine(a, np.array([[0, 1, 0], [0, 0, 0],
                                          [0, 0, 0.]])) == pytest.approx(0.0)


def test_summarize_heads_paper_pattern():
  d = 3
  kq = np.zeros((2, d + 1, d + 1))
  kq[0, :d, :d] = 0.5 * np.eye(d)
  kq[1, :d, :d] = -0.5 * np.eye(d)
  kq[1, 0, 1] = 0.5            # one off-diagonal entry in head 1
  ov = np.zeros((2, d + 1, 1))
  ov[0, d, 0], ov[1, d, 0] = 2.0, -2.0
  s = kq_ov.summarize_heads(kq, ov, kq_block=slice(0, d))
  np.testing.assert_allclose(s["kq_diag_ratio"], [1.0, np.sqrt(3) / 2])
  np.testing.assert_allclose(s["kq_diag_mean"], [0.5, -0.5])
  np.testing.assert_allclose(s["ov_last_entry_ratio"], [1.0, 1.0])
  assert s["num_active"] == 2
  assert s["ov_last_zero_sum"] == pytest.approx(0.0)
  assert s["mean_active_kq_diag_ratio"] == pytest.approx(
      (1 + np.sqrt(3) / 2) / 2)


def test_errors():
  with pytest.raises(ValueError, match="m"):
    kq_ov.diagonal_ratio(np.ones((2, 3)))
  with pytest.raises(ValueError, match="kq"):
    kq_ov.summarize_heads(np.ones((2, 3, 3)), np.ones((3, 3, 1)))
