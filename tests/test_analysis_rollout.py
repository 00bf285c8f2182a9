"""Attention rollout / flow on a hand-computed 2-layer graph, and every
analysis tool on maps recorded from a tiny attnjax ViT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import analysis as an

A1 = [[1.0, 0.0], [0.5, 0.5]]
A2 = [[0.0, 1.0], [1.0, 0.0]]
L = lambda a: jnp.asarray(a, jnp.float32)[None, None]      # one head


def test_rollout_hand_case():
  # A1' = [[1, 0], [.25, .75]], A2' = [[.5, .5], [.5, .5]]; rollout = A2' A1'
  np.testing.assert_allclose(an.attention_rollout([L(A1), L(A2)])[0],
                             [[0.625, 0.375], [0.625, 0.375]], atol=1e-6)
  np.testing.assert_allclose(
      an.attention_rollout([L(A1), L(A2)], residual=False)[0],
      np.asarray(A2) @ np.asarray(A1), atol=1e-6)
  # head fusion: max over heads of the two layers' maps, then renormalized
  two = jnp.asarray([[A1, A2]], jnp.float32)
  np.testing.assert_allclose(an.fuse_heads(two, "max", residual=False)[0],
                             [[0.5, 0.5], [2 / 3, 1 / 3]], atol=1e-6)
  with pytest.raises(ValueError, match="head_fusion"):
    an.fuse_heads(two, "median")


def test_flow_hand_case():
  # top0 -> mid{0,1} with 0.5 each; mid0 -> in0 (1); mid1 -> in0 .25, in1 .75
  # flow(top0 -> in0) = .5 + .25, flow(top0 -> in1) = .5
  np.testing.assert_allclose(an.attention_flow([L(A1), L(A2)])[0],
                             [[0.75, 0.5], [0.75, 0.5]], atol=1e-9)


def test_flow_rows_are_rows_of_the_full_flow():
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.dirichlet(np.ones(5), (2, 2, 5)), jnp.float32)
          for _ in range(3)]                               # [B, N, T, T] x 3
  full = an.attention_flow(maps)
  np.testing.assert_allclose(an.attention_flow(maps, rows=[0]), full[:, :1],
                             atol=1e-12)
  np.testing.assert_allclose(an.attention_flow(maps, rows=[3, -1]),
                             full[:, [3, 4]], atol=1e-12)
  with pytest.raises(ValueError, match="rows"):
    an.attention_flow(maps, rows=[5])


@pytest.fixture(scope="module")
def vit_maps():
  from attnjax.models import vision as V
  model = V.create_model("vit", "tiny", in_chans=1, seed=0)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 16, 16, 1))
  return an.ordered_layers(V.attention_maps(model, x))


def test_tools_on_recorded_vit_maps(vit_maps):
  maps = [m for _, m in vit_maps]
  b, n, t, _ = maps[0].shape
  # Rollout: a product of row-stochastic matrices.
  r = an.attention_rollout(dict(vit_maps))
  np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-4)
  np.testing.assert_allclose(
      r, an.attention_rollout(maps), atol=1e-6)
  # One-layer flow equals that layer's capacities (a single edge per path).
  np.testing.assert_allclose(an.attention_flow(maps[:1])[:1],
                             an.fuse_heads(maps[0])[:1], atol=1e-5)
  ent = an.attention_entropy(maps[0])
  assert ent.shape == (b, n, t)
  assert np.all(np.asarray(ent) >= -1e-6) and np.all(np.asarray(ent) <= np.log(t) + 1e-5)
  er = an.effective_rank(maps[0])
  assert np.all((np.asarray(er) >= 1 - 1e-4) & (np.asarray(er) <= t + 1e-3))
  rate, per = an.sink_rate(dict(vit_maps), token=0)
  assert 0.0 <= rate <= 1.0 and len(per) == len(maps)
  d = np.asarray(an.head_divergence(maps[-1]))
  np.testing.assert_allclose(d, np.swapaxes(d, 1, 2), atol=1e-6)
  assert np.all(d <= np.log(2) + 1e-5)
  cls = an.cls_attention(maps[-1])
  idx = an.select_tokens(cls, 5)
  want = np.sort(np.argsort(-np.asarray(cls), -1, kind="stable")[:, :5], -1)
  np.testing.assert_array_equal(idx, want)
