"""Tests for random-feature attention (layer + study binary + colab)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models.random_feature_attention import (
    FrozenRandom, RandomFeatureAttention, random_feature_attention,
    random_feature_attention_features, random_feature_attention_reference,
    sample_qk_weights)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_reference(q, k, w, v, nonlinearity, mask=None):
  """float64 NumPy loop reference: one query, head and key at a time."""
  q, k, w, v = (np.asarray(a, np.float64) for a in (q, k, w, v))
  b, t, _ = q.shape
  s = k.shape[1]
  m, _, o = v.shape
  valid = (np.ones((b, t, s), bool) if mask is None
           else np.broadcast_to(np.asarray(mask), (b, t, s)))
  out = np.zeros((b, t, o))
  for bi in range(b):
    for ti in range(t):
      idx = [i for i in range(s) if valid[bi, ti, i]]
      if not idx:
        continue
      for mi in range(m):
        z = np.array([q[bi, ti] @ w[mi] @ k[bi, i] for i in idx])
        if nonlinearity == "relu":
          a = np.maximum(z, 0) / len(idx)
        else:
          e = np.exp(z - z.max())
          a = e / e.sum()
        for ai, i in zip(a, idx):
          out[bi, ti] += ai * (k[bi, i] @ v[mi])
  return out


def _inputs(b=2, t=3, s=5, d=4, m=6, o=2, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, d), dtype)
  k = jax.random.normal(ks[1], (b, s, d), dtype)
  w = sample_qk_weights(ks[2], m, d, mean="identity", mean_scale=0.5, std=0.7)
  v = jax.random.normal(ks[3], (m, d, o), jnp.float32)
  return q, k, w, v


@pytest.mark.parametrize("nonlinearity", ["relu", "softmax"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_values_vs_numpy_float64(nonlinearity, use_mask):
  q, k, w, v = _inputs()
  mask = None
  if use_mask:
    mask = jax.random.bernoulli(jax.random.key(9), 0.6, (2, 3, 5))
    mask = mask.at[0, 1].set(False)            # one query with no keys
  want = np_reference(q, k, w, v, nonlinearity, mask)
  got = random_feature_attention(q, k, w, v, nonlinearity=nonlinearity,
                                 mask=mask)
  ref = random_feature_attention_reference(q, k, w, v,
                                           nonlinearity=nonlinearity, mask=mask)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(ref, want, rtol=2e-5, atol=2e-5)
  assert np.all(np.isfinite(np.asarray(got)))
  if use_mask:
    np.testing.assert_array_equal(np.asarray(got[0, 1]), 0.0)


def test_features_are_what_output_is_linear_in():
  q, k, w, v = _inputs()
  f = random_feature_attention_features(q, k, w)
  assert f.shape == (2, 3, 6, 4)
  np.testing.assert_allclose(jnp.einsum("btme,meo->bto", f, v),
                             random_feature_attention(q, k, w, v), rtol=1e-5,
                             atol=1e-5)


def test_unbatched_matches_batched():
  q, k, w, v = _inputs(b=1)
  np.testing.assert_allclose(random_feature_attention(q[0], k[0], w, v),
                             random_feature_attention(q, k, w, v)[0],
                             rtol=1e-6)


@pytest.mark.parametrize("nonlinearity", ["relu", "softmax"])
def test_gradients_vs_reference(nonlinearity):
  q, k, w, v = _inputs()

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, w, v, nonlinearity=nonlinearity)))

  # jitted: one compiled program each (eager autodiff compiles every op)
  g = jax.jit(jax.grad(lambda *a: loss(random_feature_attention, *a),
                       argnums=(0, 1, 2)))(q, k, v)
  gr = jax.jit(jax.grad(
      lambda *a: loss(random_feature_attention_reference, *a),
      argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, gr):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Values gradient against float64 numpy finite differences.
  v64 = np.asarray(v, np.float64)
  eps = 1e-6
  idx = (1, 2, 0)
  vp, vm = v64.copy(), v64.copy()
  vp[idx] += eps
  vm[idx] -= eps
  fd = (np.sin(np_reference(q, k, w, vp, nonlinearity)).sum()
        - np.sin(np_reference(q, k, w, vm, nonlinearity)).sum()) / (2 * eps)
  np.testing.assert_allclose(g[2][idx], fd, rtol=1e-3, atol=1e-4)


def test_bfloat16_close_to_float32_and_dtype():
  q, k, w, v = _inputs()
  out32 = random_feature_attention(q, k, w, v)
  out16 = random_feature_attention(q.astype(jnp.bfloat16),
                                   k.astype(jnp.bfloat16), w, v)
  assert out16.dtype == jnp.bfloat16
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out16, np.float32), out32,
                             rtol=5e-2, atol=5e-2 * float(jnp.abs(out32).max()))


def test_jit_and_vmap():
  q, k, w, v = _inputs()
  eager = random_feature_attention(q, k, w, v, nonlinearity="softmax")
  jitted = jax.jit(lambda *a: random_feature_attention(
      *a, nonlinearity="softmax"))(q, k, w, v)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  # vmap over a stack of independent weight draws.
  ws = jnp.stack([w, 2 * w])
  vm = jax.vmap(lambda ww: random_feature_attention(q, k, ww, v))(ws)
  np.testing.assert_allclose(vm[1], random_feature_attention(q, k, 2 * w, v),
                             rtol=1e-5, atol=1e-6)
  # vmap over the batch with unbatched inputs.
  vb = jax.vmap(lambda qq, kk: random_feature_attention(qq, kk, w, v))(q, k)
  np.testing.assert_allclose(vb, random_feature_attention(q, k, w, v),
                             rtol=1e-5, atol=1e-6)


def test_relu_is_positively_homogeneous_in_weights():
  # ReLU features scale linearly with W; softmax ones do not.
  q, k, w, v = _inputs()
  np.testing.assert_allclose(random_feature_attention(q, k, 3 * w, v),
                             3 * random_feature_attention(q, k, w, v),
                             rtol=1e-5, atol=1e-5)


def test_permutation_invariant_in_keys():
  q, k, w, v = _inputs()
  perm = jnp.array([3, 0, 4, 1, 2])
  for nl in ("relu", "softmax"):
    np.testing.assert_allclose(
        random_feature_attention(q, k[:, perm], w, v, nonlinearity=nl),
        random_feature_attention(q, k, w, v, nonlinearity=nl),
        rtol=1e-5, atol=1e-6)


def test_sample_qk_weights_moments():
  w0 = sample_qk_weights(jax.random.key(0), 4000, 3, std=0.5)
  wi = sample_qk_weights(jax.random.key(0), 4000, 3, mean="identity",
                         mean_scale=2.0, std=0.5)
  np.testing.assert_allclose(w0.mean(0), np.zeros((3, 3)), atol=0.05)
  np.testing.assert_allclose(wi.mean(0), 2 * np.eye(3), atol=0.05)
  np.testing.assert_allclose(w0.std(0), 0.5 * np.ones((3, 3)), atol=0.03)
  custom = np.arange(9.0).reshape(3, 3)
  wc = sample_qk_weights(jax.random.key(1), 2, 3, mean=custom, std=0.0)
  np.testing.assert_array_equal(wc, np.stack([custom, custom]))


def test_errors_name_arguments_and_shapes():
  q, k, w, v = _inputs()
  with pytest.raises(ValueError, match=r"`key` dim 3 .*query.*\(2, 3, 4\)"):
    random_feature_attention(q, k[..., :3], w, v)
  with pytest.raises(ValueError, match=r"`qk_weights` must have shape "
                                       r"\[heads, 4, 4\].*\(6, 4, 3\)"):
    random_feature_attention(q, k, w[..., :3], v)
  with pytest.raises(ValueError, match=r"`values` must have shape .*\(6, 3, 2\)"):
    random_feature_attention(q, k, w, v[:, :3])
  with pytest.raises(ValueError, match=r"`values` has 5 heads"):
    random_feature_attention(q, k, w, v[:5])
  with pytest.raises(ValueError, match=r"`query` must have shape"):
    random_feature_attention(q[0, 0], k, w, v)
  with pytest.raises(ValueError, match=r"batch sizes"):
    random_feature_attention(q, k[:1], w, v)
  with pytest.raises(ValueError, match=r"`nonlinearity`"):
    random_feature_attention(q, k, w, v, nonlinearity="tanh")
  with pytest.raises(ValueError, match=r"`mask` with shape \(2, 3, 4\)"):
    random_feature_attention(q, k, w, v, mask=jnp.ones((2, 3, 4), bool))
  with pytest.raises(ValueError, match=r"`mask` must be boolean"):
    random_feature_attention(q, k, w, v, mask=jnp.ones((2, 3, 5)))
  with pytest.raises(ValueError, match=r"`query` must be floating"):
    random_feature_attention(q.astype(jnp.int32), k, w, v)
  with pytest.raises(ValueError, match=r"`mean` must be one of"):
    sample_qk_weights(jax.random.key(0), 2, 3, mean="ones")
  with pytest.raises(ValueError, match=r"`mean` array must have shape \[3, 3\]"):
    sample_qk_weights(jax.random.key(0), 2, 3, mean=np.eye(2))


def test_layer_frozen_qk_trainable_values_and_redraw():
  layer = RandomFeatureAttention(8, 4, 2, qk_mean="identity", mean_scale=1.5,
                                 value_init=nnx.initializers.normal(1.0),
                                 rngs=nnx.Rngs(0))
  assert isinstance(layer.qk_weights, FrozenRandom)
  assert not isinstance(layer.qk_weights, nnx.Param)
  params = nnx.state(layer, nnx.Param)
  assert [p for p, _ in nnx.to_flat_state(params)] == [("values",)]
  q, k, _, _ = _inputs(d=4)
  out = layer(q, k)
  np.testing.assert_allclose(
      out, random_feature_attention_reference(q, k, layer.qk_weights[...],
                                              layer.values[...]),
      rtol=1e-5, atol=1e-5)
  # Gradient steps move the values only.
  w_before = np.asarray(layer.qk_weights[...])
  opt = nnx.Optimizer(layer, __import__("optax").sgd(1e-4), wrt=nnx.Param)

  @nnx.jit
  def step(layer, opt):
    loss, g = nnx.value_and_grad(lambda l: jnp.mean(l(q, k) ** 2))(layer)
    opt.update(layer, g)
    return loss

  l0 = step(layer, opt)
  l1 = step(layer, opt)
  assert float(l1) < float(l0)
  np.testing.assert_array_equal(layer.qk_weights[...], w_before)
  # Redraw: same distribution, new draw, reproducible from the key.
  layer.redraw(jax.random.key(3))
  w1 = np.asarray(layer.qk_weights[...])
  assert not np.allclose(w1, w_before)
  layer.redraw(jax.random.key(3))
  np.testing.assert_array_equal(layer.qk_weights[...], w1)
  # Same rngs -> same layer.
  again = RandomFeatureAttention(8, 4, 2, qk_mean="identity", mean_scale=1.5,
                                 rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(again.qk_weights[...], w_before)
  # set_values_from_flat round trip and error.
  flat = np.arange(8 * 4 * 2, dtype=np.float32)
  layer.set_values_from_flat(flat)
  np.testing.assert_array_equal(np.asarray(layer.values[...]).ravel(), flat)
  with pytest.raises(ValueError, match=r"`flat` must have 64 entries"):
    layer.set_values_from_flat(flat[:5])
  with pytest.raises(ValueError, match=r"`nonlinearity`"):
    RandomFeatureAttention(2, 3, nonlinearity="gelu", rngs=nnx.Rngs(0))


def test_ridge_fit_recovers_a_target_in_the_model_class():
  # A target that is itself a random-feature attention model is fitted
  # (near) exactly by least squares on the features.
  layer = RandomFeatureAttention(16, 5, 1, rngs=nnx.Rngs(1))
  teacher = jax.random.normal(jax.random.key(2), (16 * 5,))
  q = jax.random.normal(jax.random.key(3), (400, 1, 5))
  k = jax.random.normal(jax.random.key(4), (400, 6, 5))
  f = np.asarray(layer.features(q, k)).reshape(400, -1)
  y = f @ np.asarray(teacher)
  w, *_ = np.linalg.lstsq(f[:300], y[:300], rcond=None)
  layer.set_values_from_flat(w)
  pred = np.asarray(layer(q[300:], k[300:]))[:, 0, 0]
  np.testing.assert_allclose(pred, y[300:], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------
# The study binary.

def _tiny_cfg():
  from experiments.configs.random_feature_attention import get_config
  return get_config("tiny")


def test_ridge_cell_matches_closed_form_ridge_float64():
  """Cholesky-per-penalty ridge == the closed form (A^T A + lam tr I)^-1
  A^T y on centred float64 features (np.linalg.solve), in the dual (n <= p)
  and primal (n > p) branches, and the chosen penalty minimizes the
  validation error over the path."""
  from experiments import random_feature_attention as study
  cfg = _tiny_cfg()
  cfg.ridge_lambdas = (1e-6, 1e-3, 1e-1)
  rng = np.random.default_rng(0)
  n_train, nv, nt, p = 40, 30, 30, 24
  feats = rng.standard_normal((n_train + nv + nt, p)).astype(np.float32)
  w_true = rng.standard_normal(p)
  y = {"he1": feats.astype(np.float64) @ w_true,
       "he2": np.sin(feats[:, 0].astype(np.float64))}
  data = {"y": y, "noise": 0.1 * rng.standard_normal(n_train + nv + nt),
          "splits": {"train": slice(0, n_train),
                     "val": slice(n_train, n_train + nv),
                     "test": slice(n_train + nv, None)}}
  for n in (16, 40):                     # dual (16 <= 24), primal (40 > 24)
    out = study.ridge_cell(cfg, feats, data, n)
    f64 = feats.astype(np.float64)
    a = f64[:n]
    mu = a.mean(0)
    a = a - mu
    for t in cfg.targets:
      yy = y[t][:n] + data["noise"][:n]
      yv = y[t][n_train:n_train + nv] + data["noise"][n_train:n_train + nv]
      vals = []
      for lam in cfg.ridge_lambdas:
        g = a.T @ a
        w = np.linalg.solve(g + lam * np.trace(g) * np.eye(p),
                            a.T @ (yy - yy.mean()))
        pv = (f64[n_train:n_train + nv] - mu) @ w + yy.mean()
        vals.append((np.mean((pv - yv) ** 2) / np.var(yv), lam, w))
      val, lam, w = min(vals, key=lambda v: v[0])
      assert out[t]["ridge_lambda"] == lam
      np.testing.assert_allclose(out[t]["weights"], w, rtol=1e-6, atol=1e-8)
      assert out[t]["val_error"] == pytest.approx(val, rel=1e-8)
      pt = (f64[n_train + nv:] - mu) @ w + yy.mean()
      ref = np.mean((pt - y[t][n_train + nv:]) ** 2) / np.var(
          y[t][n_train + nv:])
      assert out[t]["test_error"] == pytest.approx(ref, rel=1e-6)


def test_study_resume_and_determinism(tmp_path):
  from experiments import random_feature_attention as study
  cfg = _tiny_cfg()
  a = str(tmp_path / "a")
  res_a, stats = study.run(cfg, a)
  # 2 draws x 3 models x (3 sample sizes + 2 head counts)
  assert stats["cells_computed"] == stats["cells_total"] == 2 * 3 * (3 + 2)
  for key in ("test_error", "test_error_std", "headline", "param_counts",
              "ridge_lambda", "layer_check_max_abs_diff"):
    assert key in res_a
  assert res_a["layer_check_max_abs_diff"] < 1e-4
  assert len(set(res_a["param_counts"].values())) == 1   # matched params
  for name in ("test_error_vs_n.png", "test_error_he1.png", "results.json"):
    assert os.path.getsize(os.path.join(a, name)) > 0
  # Re-run: nothing recomputed, same numbers.
  res_again, stats = study.run(cfg, a)
  assert stats["cells_computed"] == 0
  assert res_again["test_error"] == res_a["test_error"]
  # Lose some cells (as if killed mid-run): only those are recomputed and
  # the numbers are identical.
  cells = sorted(os.listdir(os.path.join(a, "cells")))
  for c in cells[:4]:
    os.remove(os.path.join(a, "cells", c))
  res_resumed, stats = study.run(cfg, a)
  assert stats["cells_computed"] == 4
  assert res_resumed["test_error"] == res_a["test_error"]
  # Same seed in a fresh workdir: same numbers; another seed: different.
  res_b, _ = study.run(cfg, str(tmp_path / "b"))
  assert res_b["test_error"] == res_a["test_error"]
  cfg.seed = 1
  res_c, _ = study.run(cfg, str(tmp_path / "c"))
  assert res_c["test_error"] != res_a["test_error"]
  # Errors are relative MSEs: finite, non-negative, and the easy target is
  # learned by RFA at the largest n.
  errs = res_a["test_error"]
  assert all(np.isfinite(e) and e >= 0 for m in errs for t in errs[m]
             for e in errs[m][t])
  assert errs["rfa_identity"]["he1"][-1] < 0.5


def test_fit_slope_recovers_power_laws():
  from experiments import random_feature_attention as study
  xs = np.array([64, 128, 256, 512, 1024, 4096])
  for a in (-1.0, -0.5, 0.0):
    assert abs(study.fit_slope(xs, 3.0 * xs ** a) - a) < 1e-10
  assert np.isnan(study.fit_slope([1, 2], [0.0, 0.0]))


def test_heads_axis_reuses_features_consistently(tmp_path):
  """The heads-axis cell with all M heads at n = heads_n is the same fit as
  the sample-size cell at that n; fewer heads = the first M' heads' columns
  of the layer (checked against a layer built with M' heads' weights)."""
  from experiments import random_feature_attention as study
  cfg = _tiny_cfg()
  cfg.num_repeats = 1
  cfg.models = ("rfa_zero", "rf_mlp")
  cfg.head_counts = (4, 16)           # 16 = num_heads
  cfg.heads_n = 64
  res, _ = study.run(cfg, str(tmp_path))
  i = list(res["sample_sizes"]).index(64)
  for m in cfg.models:
    for t in cfg.targets:
      assert res["heads_axis"]["test_error"][m][t][-1] == pytest.approx(
          res["test_error"][m][t][i], rel=1e-9)
  # columns of the first M' heads == features of a layer holding those heads
  data = study.make_data(cfg, 0)
  layer = study.build_rfa(cfg, "rfa_zero", 0)
  full = study.model_features(cfg, "rfa_zero", 0, data, layer)
  sub = RandomFeatureAttention(4, cfg.dim + 1, 1, rngs=nnx.Rngs(0))
  sub.qk_weights.set_value(layer.qk_weights[...][:4])
  q, k = data["q"][:32], data["k"][:32]
  np.testing.assert_allclose(
      np.asarray(sub.features(q, k)).reshape(32, -1),
      full[:32, :4 * (cfg.dim + 1)], rtol=1e-5, atol=1e-6)
  assert set(res["slopes"]) == {"vs_n", "vs_heads"}
  assert "identity_loses_on" in res["headline"]
  assert os.path.getsize(os.path.join(str(tmp_path),
                                      "test_error_vs_heads.png")) > 0


def test_study_shows_paper_findings_small():
  """A small but not tiny run must show both findings of the paper."""
  from experiments import random_feature_attention as study
  import tempfile
  cfg = _tiny_cfg()
  cfg.dim, cfg.num_keys, cfg.num_heads = 6, 6, 48
  cfg.identity_mean_scale = 3.0
  cfg.sample_sizes = (128, 512)
  cfg.head_counts = ()
  cfg.num_val, cfg.num_test = 300, 500
  cfg.num_repeats = 1
  cfg.targets = ("he1", "he2")
  cfg.feature_batch = 512
  with tempfile.TemporaryDirectory() as d:
    res, _ = study.run(cfg, d)
  e = res["test_error"]
  assert e["rfa_zero"]["he1"][-1] < 0.5 * e["rf_mlp"]["he1"][-1]
  assert e["rfa_identity"]["he2"][-1] < 0.8 * e["rfa_zero"]["he2"][-1]
  assert res["headline"]["identity_mean_helps"]


def test_config_presets():
  from experiments.configs.random_feature_attention import get_config
  for p in ("default", "paper", "tiny"):
    c = get_config(p)
    assert c.num_heads > 0 and len(c.sample_sizes) >= 3
  with pytest.raises(ValueError, match="unknown preset"):
    get_config("huge")


@pytest.mark.slow
def test_colab_runs_tiny():
  try:
    from tests.notebook_runner import output_text, run_notebook
  except ImportError:
    from notebook_runner import output_text, run_notebook
  nb = run_notebook(os.path.join(ROOT, "colabs",
                                 "random_feature_attention.ipynb"))
  text = output_text(nb)
  assert "rfa_zero" in text and "rf_mlp" in text
