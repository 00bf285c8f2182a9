"""Tests for the low-rank-bottleneck study (Bhojanapalli et al. 2020)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models.rank_models import (RecallTransformer,
                                        associative_recall_batch)
from experiments import low_rank_bottleneck as study
from experiments.benefits_of_rank import Stopped, count_params
from experiments.configs import low_rank_bottleneck as configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recall_batch_semantics():
  keys, values, query, answer = associative_recall_batch(
      jax.random.key(0), 32, 5, 9, 7)
  keys, values = np.asarray(keys), np.asarray(values)
  query, answer = np.asarray(query), np.asarray(answer)
  assert keys.shape == values.shape == (32, 5)
  assert keys.min() >= 0 and keys.max() < 9
  assert values.min() >= 0 and values.max() < 7
  for b in range(32):
    assert len(set(keys[b].tolist())) == 5            # distinct keys
    pos = np.nonzero(keys[b] == query[b])[0]
    assert len(pos) == 1 and values[b, pos[0]] == answer[b]
  with pytest.raises(ValueError, match="num_pairs"):
    associative_recall_batch(jax.random.key(0), 2, 10, 9, 7)


@pytest.mark.parametrize("heads", [1, 4, 16])
def test_recall_model_head_sizes(heads):
  width = 16
  std = RecallTransformer(num_keys=8, num_values=8, width=width,
                          num_heads=heads, rngs=nnx.Rngs(0))
  fixed = RecallTransformer(num_keys=8, num_values=8, width=width,
                            num_heads=heads, head_dim=4, rngs=nnx.Rngs(0))
  assert std.head_dim == width // heads and fixed.head_dim == 4
  kq, _ = std.encoder.blocks[0].attn.merged_matrices()
  for h in range(heads):
    assert np.linalg.matrix_rank(np.asarray(kq[h], np.float64),
                                 tol=1e-5) == width // heads
  base = RecallTransformer(num_keys=8, num_values=8, width=width,
                           num_heads=1, rngs=nnx.Rngs(0))
  assert count_params(std) == count_params(base)   # standard: same budget
  keys, values, query, _ = associative_recall_batch(jax.random.key(1), 3, 4,
                                                    8, 8)
  assert fixed(keys, values, query).shape == (3, 8)
  with pytest.raises(ValueError, match="width"):
    RecallTransformer(num_keys=8, num_values=8, width=10, num_heads=4,
                      rngs=nnx.Rngs(0))


def test_head_probs_matches_numpy():
  x, p = study.fit_problem(jax.random.key(0), 3, 5, 7, 2.0)
  wq = jax.random.normal(jax.random.key(1), (3, 7, 2))
  wk = jax.random.normal(jax.random.key(2), (3, 7, 2))
  got = np.asarray(study.head_probs(x, wq, wk))
  xn, qn, kn = (np.asarray(a, np.float64) for a in (x, wq, wk))
  s = np.einsum("tnp,tmp->tnm", xn @ qn, xn @ kn)
  ref = np.exp(s - s.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  pn = np.asarray(p)
  assert np.all(pn > 0)
  np.testing.assert_allclose(pn.sum(-1), 1.0, atol=1e-6)


def test_exact_construction_reproduces_p():
  x, p = study.fit_problem(jax.random.key(3), 1, 6, 9, 2.0)
  x64, p64 = np.asarray(x[0], np.float64), np.asarray(p[0], np.float64)
  wq, wk = study.exact_construction(jnp.asarray(x64), jnp.asarray(p64))
  assert wq.shape == (9, 6) and wk.shape == (9, 6)
  s = (x64 @ np.asarray(wq)) @ (x64 @ np.asarray(wk)).T
  ph = np.exp(s - s.max(-1, keepdims=True))
  ph /= ph.sum(-1, keepdims=True)
  np.testing.assert_allclose(ph, p64, atol=1e-4)


def test_fit_error_near_zero_at_n_and_not_below(tmp_path):
  cfg = configs.get_config("tiny")
  cfg.fit.n, cfg.fit.d, cfg.fit.trials = 4, 6, 2
  cfg.fit.head_sizes = "1,4"
  cfg.fit.steps = 3000
  cfg.chunk, cfg.ckpt_every = 500, 1500
  cfg.recall.heads = ""
  res = study.run_study(cfg, str(tmp_path))
  err = res["fit"]["rel_error"]
  assert err["d_p=4"] < 1e-4, err
  assert err["d_p=1"] > 1e-2, err
  assert res["fit"]["min_error_below_n"] == err["d_p=1"]
  assert res["fit"]["max_error_at_or_above_n"] == err["d_p=4"]
  assert res["fit"]["exact_threshold"] in (None, 4)


def test_configs_and_docstring():
  for preset in configs.PRESETS:
    cfg = configs.get_config(preset)
    assert cfg.ckpt_every % cfg.chunk == 0
    assert cfg.fit.steps % cfg.chunk == 0
    assert cfg.recall.steps % cfg.chunk == 0
    assert cfg.fit.d >= cfg.fit.n
  assert "python -m experiments.low_rank_bottleneck" in configs.__doc__
  with pytest.raises(ValueError):
    configs.get_config("nope")


def test_resume_identical_and_skips_finished_cells(tmp_path):
  def cfg_():
    c = configs.get_config("tiny")
    c.fit.head_sizes = "4"
    c.recall.heads = "2"
    return c
  full = study.run_study(cfg_(), str(tmp_path / "full"))
  killed = str(tmp_path / "killed")
  c = cfg_()
  c.stop_after_steps = 50        # fit (40) done, 1st recall cell at 10
  with pytest.raises(Stopped):
    study.run_study(c, killed)
  first = os.path.join(killed, "cells", "fit_dp4.json")
  assert os.path.exists(first)
  mtime = os.path.getmtime(first)
  resumed = study.run_study(cfg_(), killed)
  assert os.path.getmtime(first) == mtime
  assert resumed["fit"] == full["fit"]
  assert resumed["recall"] == full["recall"]
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if l.strip()]
  assert steps == sorted(set(steps)) and len(steps) == 8
  for name in ("fit_error.png", "recall_scaling.png"):
    assert os.path.exists(os.path.join(killed, name))


@pytest.mark.slow
def test_colab_runs():
  from tests.notebook_runner import output_text, run_notebook
  nb = run_notebook(os.path.join(ROOT, "colabs",
                                 "low_rank_bottleneck.ipynb"), timeout=300)
  text = output_text(nb)
  assert "exact construction error" in text
  assert "fixed" in text
