"""Geometric sink measurements (Ruscio et al. 2025) and visual attention
sinks (Kang et al. 2025) on hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as an


def _rows(rows, t=None):
  """Every query row equal to `rows` ([S]) -> [1, 1, T, S]."""
  r = np.asarray(rows, np.float64)
  t = r.size if t is None else t
  return jnp.asarray(np.broadcast_to(r, (t, r.size)), jnp.float32)[None, None]


def test_reference_tokens():
  row = np.full(10, 0.3 / 8)
  row[0], row[1] = 0.5, 0.2
  np.testing.assert_array_equal(an.reference_tokens(_rows(row))[0],
                                np.arange(10) < 2)
  # none above 0.1: the top 10% (2 of 20)
  row = np.full(20, 0.83 / 18)
  row[5], row[7] = 0.09, 0.08
  np.testing.assert_array_equal(np.nonzero(an.reference_tokens(_rows(row))[0])[0],
                                [5, 7])
  # at most 30% of the keys: 4 keys above 0.1 of 10, cap 3 keeps the largest
  row = np.array([0.14, 0.2, 0.3, 0.16] + [0.2 / 6] * 6)
  np.testing.assert_array_equal(np.nonzero(an.reference_tokens(_rows(row))[0])[0],
                                [1, 2, 3])


def test_reference_decomposition():
  a = jnp.asarray([[[[1, 0, 0], [0.5, 0.5, 0], [0.5, 0.25, 0.25]]]])
  v = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
  d = an.reference_decomposition(a, v, np.array([[True, False, False]]))
  # query 1: o = (.5, .5), r = (.5, 0); query 2: o = r = (.5, 0)
  np.testing.assert_allclose(d["relative_magnitude"][0, 1:], [1 / np.sqrt(2), 1])
  np.testing.assert_allclose(d["directional_influence"][0, 1:],
                             [(1 / np.sqrt(2) + 1) / 2, 1.0])
  np.testing.assert_allclose(d["information_change"][0, 1:], [0.5, 0.5])
  np.testing.assert_array_equal(d["valid"][0], [False, True, True])
  np.testing.assert_allclose(d["relative_magnitude_mean"], [(1 / np.sqrt(2) + 1) / 2])
  with pytest.raises(ValueError, match="values"):
    an.reference_decomposition(a, v[:, :2], np.ones((1, 3), bool))


def test_attention_graph_stats():
  star = an.attention_graph_stats(_rows([1.0, 0, 0, 0]))
  # in-degrees (4, 0, 0, 0): Gini .75, centralization 12/9; Laplacian of a
  # star with edge weight 1/2: eigenvalues (0, .5, .5, 2)
  want = {"basic_star_likeness": 4 / 3, "gini": 0.75,
          "degree_centralization": 12 / 9, "star_likeness": 0.4 + 0.525,
          "fiedler_value": 0.5, "spectral_gap": 0.0, "max_in_degree": 4}
  for k, v in want.items():
    np.testing.assert_allclose(star[k], [v], atol=1e-9, err_msg=k)
  diag = an.attention_graph_stats(jnp.eye(4)[None, None])
  for k, v in {"basic_star_likeness": 1 / 3, "gini": 0.0,
               "degree_centralization": 0.0, "fiedler_value": 0.0}.items():
    np.testing.assert_allclose(diag[k], [v], atol=1e-9, err_msg=k)


def test_sink_kl():
  h0 = [[0.5, 0.5], [0.5, 0.5]]
  h1 = [[0.9, 0.1], [0.9, 0.1]]
  out = an.sink_kl(jnp.asarray([[h0, h1]]))
  np.testing.assert_array_equal(out["sinks"], [[True, False]])
  kl = lambda p, q: sum(a * np.log(a / b) for a, b in zip(p, q))
  want = [kl([.5, .5], [.7, .3]), kl([.9, .1], [.7, .3])]
  np.testing.assert_allclose(out["with_sinks"][0], want, rtol=1e-5)
  # without the sink both heads put everything on key 1: identical, KL 0
  np.testing.assert_allclose(out["without_sinks"][0], [0, 0], atol=1e-9)
  np.testing.assert_allclose(out["reduction"][0], want, rtol=1e-5)


def test_visual_sink_detector():
  d, t = 8, 6
  h = np.ones((1, t, d))
  h[0, 0, [3, 5]] = 60.0          # the reference (BOS-like) sink token
  h[0, 2, 5] = 50.0               # a visual token lighting up a sink dim
  h[0, 4, 1] = 50.0               # massive, but not in a sink dimension
  dims, scores = an.find_sink_dimensions(h, reference=0, num_dims=2)
  assert sorted(dims.tolist()) == [3, 5]
  rms0 = np.sqrt((2 * 3600 + 6) / 8)
  np.testing.assert_allclose(scores[[3, 5, 0]], [60 / rms0, 60 / rms0, 1 / rms0],
                             rtol=1e-5)
  phi = np.asarray(an.sink_dimension_values(h, [3, 5]))
  rms2 = np.sqrt((2500 + 7) / 8)
  np.testing.assert_allclose(phi[0], [60 / rms0, 1.0, 50 / rms2, 1.0,
                                      1 / rms2, 1.0], rtol=1e-5)
  visual = np.array([False, True, True, True, True, False])   # image tokens
  sink = np.asarray(an.visual_sink_tokens(h, [3, 5], tau=2.0, visual=visual))
  np.testing.assert_array_equal(sink[0], [False, False, True, False, False, False])
  # attention: query rows over keys 0..5
  maps = jnp.asarray([[[[0.3, 0.1, 0.4, 0.1, 0.1, 0.0],
                        [0.9, 0.0, 0.05, 0.05, 0.0, 0.0]]]])
  image, ratio = an.visual_sink_attention(maps, sink[0], visual)
  np.testing.assert_allclose(image[0, 0], [0.7, 0.1], atol=1e-6)
  np.testing.assert_allclose(ratio[0, 0], [0.3 / 0.7, 0.5], atol=1e-6)
  heads = an.image_centric_heads(maps, sink[0], visual, rho=0.4)
  np.testing.assert_array_equal(heads[0, 0], [True, False])
  with pytest.raises(ValueError, match="dims"):
    an.sink_dimension_values(h, [8])
  with pytest.raises(ValueError, match="reference"):
    an.find_sink_dimensions(h, reference=9)


def test_hidden_states_are_block_inputs():
  from flax import nnx
  from attnjax.models.vision._layers import Block
  from attnjax.nn import MultiHeadAttention

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.blocks_ = nnx.List([
          Block(8, MultiHeadAttention(2, 8, rngs=rngs), mlp_ratio=0, rngs=rngs)
          for _ in range(2)])

    def __call__(self, x):
      for b in self.blocks_:
        x = b(x)
      return x

  model = Tiny(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 5, 8))
  hs = an.ordered_layers(an.hidden_states(model, x))
  assert [p for p, _ in hs] == ["blocks_/0", "blocks_/1"]
  np.testing.assert_allclose(hs[0][1], x)
  # block 1's input is block 0's output
  np.testing.assert_allclose(hs[1][1], model.blocks_[0](x), atol=1e-6)
