"""experiments.recall_benchmark (Zoology's MQAR): the data generator against
a hand-built example, and a tiny training run where softmax attention beats
chance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import recall_benchmark as rb
from experiments.configs import recall_benchmark as rb_cfg


def test_assemble_matches_hand_built_example():
  keys = jnp.array([3, 5, 2])
  values = jnp.array([9, 12, 9])
  order = jnp.array([2, 0, 1])          # query k_3 (=2), then 3, then 5
  pos = jnp.array([7, 9, 10])
  filler = jnp.arange(100, 112)
  tokens, targets = rb.assemble_mqar(keys, values, order, pos, filler, 12)
  want_tokens = [3, 9, 5, 12, 2, 9, 106, 2, 108, 3, 5, 111]
  want_targets = [-1, -1, -1, -1, -1, -1, -1, 9, -1, 9, 12, -1]
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_array_equal(targets, want_targets)


def test_random_batches_are_consistent_recall_problems():
  t, d, vocab = 32, 4, 32
  gen = jax.jit(rb.mqar_batch, static_argnums=(1, 2, 3, 4))
  tokens, targets = gen(jax.random.key(0), 16, t, d, vocab)
  tokens, targets = np.asarray(tokens), np.asarray(targets)
  assert tokens.shape == targets.shape == (16, t)
  for x, y in zip(tokens, targets):
    ks, vs = x[0:2 * d:2], x[1:2 * d:2]
    assert len(set(ks)) == d and np.all((ks >= 1) & (ks < vocab // 2))
    assert np.all((vs >= vocab // 2) & (vs < vocab))
    q = np.nonzero(y >= 0)[0]
    assert len(q) == d and np.all(q >= 2 * d)
    table = dict(zip(ks, vs))
    assert sorted(x[q]) == sorted(ks)
    assert all(table[x[i]] == y[i] for i in q)
  with pytest.raises(ValueError, match="num_pairs"):
    rb.mqar_batch(jax.random.key(0), 2, 8, 3, 32)


def test_tiny_training_beats_chance(tmp_path):
  cfg = rb_cfg.get_config("tiny")
  res = rb.run_study(cfg, str(tmp_path))
  acc = res["accuracy"]["softmax"]["d=32"]["T=16"]
  # Above the plateau every model passes through, guessing one of the D
  # values in context: (1 + (D - 1) / values) / D = 0.5625 here (D = 2, 8
  # values, repeats allowed), far above chance (2 / vocab = 0.125).
  d, values = 16 // cfg.pairs_per_len, cfg.vocab - cfg.vocab // 2
  plateau = (1 + (d - 1) / values) / d
  assert acc > plateau + 0.1, (acc, plateau)
  assert (tmp_path / "accuracy_vs_width.png").exists()
  # A re-run in the same workdir reads the finished cell back (no retraining).
  again = rb.run_study(cfg, str(tmp_path))
  assert again["accuracy"] == res["accuracy"]


def test_position_embedding_on_the_token_embedding_scale():
  # At std 0.02 (9x below the tokens' 1/sqrt(width)) softmax stayed on the
  # guess-a-value plateau for the whole 1000-step CPU default (loss 0.70 =
  # log 2 at T = 16, width 32); on the tokens' scale it solves that cell.
  from flax import nnx
  cfg = rb_cfg.get_config("tiny")
  m = rb.RecallModel("softmax", vocab=64, seq_len=32, width=64, num_layers=1,
                     head_dim=16, cfg=cfg, rngs=nnx.Rngs(0))
  tok = float(np.std(np.asarray(m.embed.embedding.value)))
  pos = float(np.std(np.asarray(m.pos.value)))
  np.testing.assert_allclose(tok, 1 / np.sqrt(64), rtol=0.1)
  np.testing.assert_allclose(pos, tok, rtol=0.1)


# -- experiments/sweep.py: non-trainable state in training ---------------------

def _tiny_cell(mech, **cfg_overrides):
  cfg = rb_cfg.get_config("tiny")
  cfg.mechanisms = (mech,)
  cfg.num_layers = 1
  for k, v in cfg_overrides.items():
    setattr(cfg, k, v)
  return rb.make_cells(cfg)[0]


def _mesh():
  from experiments import sharding
  return sharding.make_mesh("data:1")


def test_routing_centroids_follow_the_online_kmeans_step_in_training():
  # The paper's centroids move by an exponential moving average of the unit
  # queries and keys assigned to them. Before, the sweep closed over the
  # centroids as constants and they never moved.
  import dataclasses
  from flax import nnx
  from experiments import sweep
  cell = _tiny_cell("routing_transformer")
  assert cell.train_attributes == {"update_centroids": True}
  decay = 0.5                          # one step moves them visibly

  def mk(orig=cell.make_model):
    m = orig()
    m.blocks[0].mixer.decay = decay
    return m

  # A fixed batch (any tokens do: the step-0 update uses the initial
  # parameters' queries and keys), so the reference below needs no sampler.
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 16, (8, 16)), jnp.int32)
  targets = jnp.asarray(np.where(np.arange(16) >= 12, 9, -1)[None]
                        .repeat(8, 0), jnp.int32)
  cell = dataclasses.replace(cell, make_model=mk,
                             batch_fn=lambda key: (tokens, targets))
  b = sweep.build_cell(cell, chunk=1, mesh=_mesh())
  assert b.carries_rest
  _, _, rest, _ = b.run_chunk(b.init["params"], b.init["opt"], 0, b.rest)
  got = np.asarray(
      nnx.merge(b.graphdef, b.init["params"], rest).blocks[0].mixer
      .centroids.value, np.float64)

  # By hand, in float64 NumPy: the layer's queries and keys under the
  # initial parameters, nearest unit centroid per head, EMA toward the mean
  # of the assigned unit vectors.
  m = nnx.merge(b.graphdef, b.init["params"], b.rest)
  layer = m.blocks[0].mixer
  assert layer.update_centroids is False          # evaluation: as built
  c0 = np.asarray(layer.centroids.value, np.float64)        # [N, C, H]
  x = m.embed(tokens) + m.pos[:tokens.shape[1]]
  q, k, _ = layer.project_qkv(m.blocks[0].norm1(x))
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  q = unit(np.asarray(q, np.float64))
  k = unit(np.asarray(k, np.float64))
  want = c0.copy()
  moved = 0
  for n in range(c0.shape[0]):
    vecs = np.concatenate([q[:, :, n].reshape(-1, q.shape[-1]),
                           k[:, :, n].reshape(-1, k.shape[-1])])
    assign = np.argmax(vecs @ c0[n].T, axis=-1)
    for c in range(c0.shape[1]):
      if np.any(assign == c):
        mean = vecs[assign == c].mean(0)
        want[n, c] = unit(decay * c0[n, c] + (1 - decay) * mean)
        # toward the assigned vectors
        assert got[n, c] @ unit(mean) > c0[n, c] @ unit(mean)
        moved += 1
  assert moved > 0
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.max(np.abs(got - c0)) > 1e-2


def test_non_trainable_state_is_an_argument_of_the_training_chunk():
  # Performer's fixed random projection: passed in, not embedded as a
  # compile-time constant (XLA constant-folded work on it before: slow
  # compiles). Traced only (no compile).
  from experiments import sweep
  cell = _tiny_cell("performer", num_features=24)
  assert cell.train_attributes == {}
  b = sweep.build_cell(cell, chunk=1, mesh=_mesh())
  proj = [np.asarray(v) for v in jax.tree_util.tree_leaves(b.rest)
          if np.shape(v)[:1] == (24,)]
  assert proj, "the Performer projection is non-trainable state"
  traced = b.run_chunk.trace(b.init["params"], b.init["opt"], 0, b.rest)
  shapes = [np.shape(c) for c in traced.jaxpr.consts]
  assert not any(s == p.shape for s in shapes for p in proj), shapes
  # ... and comes back unchanged: the chunk's rest output is its input.
  jaxpr = traced.jaxpr.jaxpr
  n_p = len(jax.tree_util.tree_leaves(b.init["params"]))
  n_o = len(jax.tree_util.tree_leaves(b.init["opt"]))
  n_r = len(jax.tree_util.tree_leaves(b.rest))
  ins = jaxpr.invars[n_p + n_o + 1:n_p + n_o + 1 + n_r]
  outs = jaxpr.outvars[n_p + n_o:n_p + n_o + n_r]
  assert n_r and list(outs) == list(ins)


def test_state_updated_in_training_is_carried_checkpointed_and_resumed(
    tmp_path):
  # A toy layer keeping an EMA of its inputs while `track` is set (as the
  # routing layer's `update_centroids`): the sweep carries it across steps
  # and chunks, a killed run resumes to the same state, and evaluation sees
  # the final state with the model as built (track off).
  import jax.numpy as jnp
  from flax import nnx
  from experiments import sweep

  class Stat(nnx.Variable):
    pass

  class Toy(nnx.Module):
    def __init__(self):
      self.lin = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
      self.mean = Stat(jnp.zeros(2))
      self.track = False

    def __call__(self, x):
      if self.track:
        self.mean.value = 0.5 * self.mean.value + 0.5 * jnp.mean(x, 0)
      return self.lin(x)

  def batch_fn(key):
    x = jax.random.normal(key, (8, 2)) + 3.0
    return x, x @ jnp.array([[1.0], [-1.0]])

  def cell():
    return sweep.Cell(
        name="toy", make_model=Toy, seed=5, steps=20, lr=0.05,
        loss_fn=lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2),
        batch_fn=batch_fn, train_attributes={"track": True},
        eval_fn=lambda m: {"m0": m.mean.value[0], "m1": m.mean.value[1],
                           "track": float(m.track)})

  def train(wd, **kw):
    res = sweep.train_cells(str(wd), [cell()], chunk=5, ckpt_every=5, **kw)
    return {k: v for k, v in res["toy"].items() if k != "train_time_s"}

  want = train(tmp_path / "ref")
  # By hand: the EMA over the 20 batches the sweep draws (its data key).
  data_key = jax.random.fold_in(jax.random.key(5), 1)
  mean = np.zeros(2)
  for s in range(20):
    x = np.asarray(batch_fn(jax.random.fold_in(data_key, s))[0], np.float64)
    mean = 0.5 * mean + 0.5 * x.mean(0)
  np.testing.assert_allclose([want["m0"], want["m1"]], mean, rtol=1e-5)
  assert want["track"] == 0.0
  wd = tmp_path / "killed"
  with pytest.raises(sweep.Stopped):
    train(wd, stop_after_steps=10)
  assert train(wd) == want
