"""attnjax.analysis.head_stats on hand-computed maps."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as an


def _map(rows):
  """[T, S] rows -> [1, 1, T, S]."""
  return jnp.asarray(rows, jnp.float32)[None, None]


def test_entropy():
  m = _map([[1, 0, 0, 0], [0.25] * 4, [0.5, 0.5, 0, 0]])
  np.testing.assert_allclose(an.attention_entropy(m)[0, 0],
                             [0.0, np.log(4), np.log(2)], atol=1e-6)
  np.testing.assert_allclose(an.head_entropy(m), [(np.log(4) + np.log(2)) / 3],
                             atol=1e-6)
  # a masked (all-zero) row has zero entropy, not NaN
  assert an.attention_entropy(_map([[0, 0]]))[0, 0, 0] == 0.0


def test_effective_rank():
  np.testing.assert_allclose(an.effective_rank(_map(np.eye(4))), [[4.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(an.effective_rank(_map([[0.5, 0.5]] * 3)), [[1.0]],
                             rtol=1e-5)
  # singular values (1, 0.5) of diag(1, .5): p = (2/3, 1/3)
  p = np.array([2 / 3, 1 / 3])
  np.testing.assert_allclose(an.effective_rank(_map([[1, 0], [0, 0.5]])),
                             [[np.exp(-(p * np.log(p)).sum())]], rtol=1e-5)


def test_sink_scores_and_rate():
  head_a = [[0.6, 0.4], [0.6, 0.4]]
  head_b = [[0.1, 0.9], [0.3, 0.7]]
  m = jnp.asarray([[head_a, head_b]], jnp.float32)          # [1, 2, 2, 2]
  np.testing.assert_allclose(an.sink_scores(m, 0), [[0.6, 0.2]], atol=1e-6)
  np.testing.assert_allclose(an.sink_scores(m)[0, 1], [0.2, 0.8], atol=1e-6)
  layers = {"blocks/0": m, "blocks/1": jnp.asarray([[head_a, head_a]])}
  rate, per = an.sink_rate(layers, token=0, eps=0.3)
  assert rate == pytest.approx(0.75)
  np.testing.assert_allclose(per["blocks/0"], [0.6, 0.2], atol=1e-6)
  with pytest.raises(ValueError, match="token"):
    an.sink_scores(m, 5)


def test_head_divergence():
  m = jnp.asarray([[[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]]])   # [1, 3, 1, 2]
  d = an.head_divergence(m)[0]
  np.testing.assert_allclose(d, [[0, np.log(2), 0], [np.log(2), 0, np.log(2)],
                                 [0, np.log(2), 0]], atol=1e-6)
  # [0.5, 0.5] vs [1, 0]: 0.5 KL(p||m) + 0.5 KL(q||m), m = [0.75, 0.25]
  m2 = jnp.asarray([[[[0.5, 0.5]], [[1.0, 0.0]]]])
  want = 0.5 * (0.5 * np.log(0.5 / 0.75) + 0.5 * np.log(0.5 / 0.25)) \
      + 0.5 * np.log(1 / 0.75)
  np.testing.assert_allclose(an.head_divergence(m2)[0, 0, 1], want, atol=1e-6)


def test_gate_importance():
  c = jnp.asarray([[1.0, -2.0, 0.5], [3.0, 0.0, 4.0]])
  loss = lambda g: jnp.sum(c * g ** 2)             # dL/dg = 2 c at g = 1
  np.testing.assert_allclose(an.gate_importance(loss, (2, 3), normalize=False),
                             2 * np.abs(c), atol=1e-6)
  imp = an.gate_importance(loss, (2, 3))
  np.testing.assert_allclose(imp[1], [0.6, 0.0, 0.8], atol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="maps.*heads"):
    an.attention_entropy(jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="empty"):
    an.sink_rate({})
