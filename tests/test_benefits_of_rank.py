"""Tests for the benefits-of-rank study (Amsel, Yehudai, Bruna 2024)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models.rank_models import (RankAttentionNet,
                                        farthest_point_targets,
                                        sample_sphere, sphere_batch)
from experiments import benefits_of_rank as study
from experiments.configs import benefits_of_rank as configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _farthest_bruteforce(x):
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  for b in range(x.shape[0]):
    for i in range(x.shape[1]):
      dists = [np.sum((x[b, i] - x[b, j]) ** 2) for j in range(x.shape[1])]
      out[b, i] = x[b, int(np.argmax(dists))]
  return out


@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (16, 16)])
def test_farthest_point_matches_bruteforce(n, d):
  x = sample_sphere(jax.random.key(n * d), (3, n), d)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(x), axis=-1), 1.0,
                             atol=1e-6)
  got = np.asarray(farthest_point_targets(x))
  np.testing.assert_allclose(got, _farthest_bruteforce(x), atol=1e-6)
  # jit / vmap agree with the eager call.
  np.testing.assert_allclose(np.asarray(jax.jit(farthest_point_targets)(x)),
                             got)
  np.testing.assert_allclose(
      np.asarray(jax.vmap(farthest_point_targets)(x)), got)


def test_farthest_point_bad_input():
  with pytest.raises(ValueError, match="x"):
    farthest_point_targets(jnp.ones((4,)))


def test_sphere_batch_targets_are_members():
  x, y = sphere_batch(jax.random.key(0), 4, 6, 3)
  assert x.shape == y.shape == (4, 6, 3)
  # every target is one of the N points and never the token itself
  eq = np.all(np.isclose(np.asarray(y)[:, :, None, :],
                         np.asarray(x)[:, None, :, :]), axis=-1)
  assert np.all(eq.sum(-1) >= 1)
  assert not np.any(eq[:, np.arange(6), np.arange(6)])


def test_construction_is_near_exact_and_zero_scores_one():
  x, y = sphere_batch(jax.random.key(1), 64, 8, 8)
  pred = study.construction_predict(x, 1e4)
  assert float(study.per_vector_mse(pred, y)) < 1e-3
  # NumPy hard-attention reference of the same construction.
  xn = np.asarray(x, np.float64)
  gram = np.einsum("bid,bjd->bij", xn, xn)
  idx = np.argmin(gram, axis=-1)
  hard = np.take_along_axis(xn, idx[..., None], axis=1)
  srt = np.sort(gram, axis=-1)
  clear = (srt[..., 1] - srt[..., 0]) > 2e-3       # no near-ties
  assert clear.mean() > 0.9
  np.testing.assert_allclose(np.asarray(pred)[clear], hard[clear], atol=1e-4)
  assert abs(float(study.per_vector_mse(jnp.zeros_like(y), y)) - 1.0) < 1e-6


@pytest.mark.parametrize("rank", [8, 4, 1])
def test_rank_model_budget_and_head_rank(rank):
  d = 8
  model = RankAttentionNet(d, rank, 2, rngs=nnx.Rngs(0))
  full = RankAttentionNet(d, d, 2, rngs=nnx.Rngs(0))
  assert model.num_heads == d // rank
  assert study.count_params(model) == study.count_params(full)
  kq, _ = model.encoder.blocks[0].attn.merged_matrices()
  assert kq.shape == (d // rank, d, d)
  for h in range(d // rank):
    assert np.linalg.matrix_rank(np.asarray(kq[h], np.float64),
                                 tol=1e-5) == rank
  x = sample_sphere(jax.random.key(0), (2, 5), d)
  assert model(x).shape == (2, 5, d)


def test_rank_model_errors():
  with pytest.raises(ValueError, match="rank"):
    RankAttentionNet(8, 3, 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank"):
    RankAttentionNet(8, 9, 1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dim"):
    RankAttentionNet(8, 8, 1, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 4)))


def test_configs_and_docstring():
  for preset in configs.PRESETS:
    cfg = configs.get_config(preset)
    assert cfg.ckpt_every % cfg.chunk == 0 and cfg.steps % cfg.chunk == 0
    for r in study.ints(cfg.ranks):
      assert cfg.dim % r == 0
  assert "python -m experiments.benefits_of_rank" in configs.__doc__
  with pytest.raises(ValueError):
    configs.get_config("nope")


def test_resume_identical_and_skips_finished_cells(tmp_path):
  cfg = configs.get_config("tiny")
  full = study.run_study(cfg, str(tmp_path / "full"))

  killed = str(tmp_path / "killed")
  cfg_stop = configs.get_config("tiny")
  cfg_stop.stop_after_steps = 70        # mid-way through the 2nd cell
  with pytest.raises(study.Stopped):
    study.run_study(cfg_stop, killed)
  assert os.path.exists(os.path.join(killed, "cells", "N4_L1_r4.json"))
  assert not os.path.exists(os.path.join(killed, "cells", "N4_L1_r1.json"))
  first_cell = os.path.join(killed, "cells", "N4_L1_r4.json")
  mtime = os.path.getmtime(first_cell)
  resumed = study.run_study(cfg, killed)
  assert os.path.getmtime(first_cell) == mtime     # finished cell skipped
  assert resumed["mse"] == full["mse"]
  assert resumed["table"] == full["table"]
  # curves: one line per chunk, no duplicates after the resume
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if l.strip()]
  assert steps == sorted(set(steps)) and len(steps) == 8
  # a complete re-run trains nothing and reproduces the numbers
  again = study.run_study(cfg, killed)
  assert again["mse"] == full["mse"]
  assert os.path.exists(os.path.join(killed, "rank_vs_mse.png"))


@pytest.mark.slow
def test_colab_runs():
  from tests.notebook_runner import output_text, run_notebook
  nb = run_notebook(os.path.join(ROOT, "colabs", "benefits_of_rank.ipynb"),
                    timeout=300)
  text = output_text(nb)
  assert "construction MSE" in text
  assert "rank=" in text
