"""Tests for the low-rank-bottleneck study (Bhojanapalli et al. 2020)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models import rank_models as rm
from experiments import common
from experiments import low_rank_bottleneck as study
from experiments.configs import low_rank_bottleneck as configs
from experiments.sweep import Stopped, count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- references

def _np(x):
  return np.asarray(x, np.float64)


def _ln(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _forward_np(model, x, causal):
  """float64 NumPy forward of HeadSizeTransformer from its parameters."""
  if model.embed.__class__.__name__ == "Embed":
    h = _np(model.embed.embedding[...])[np.asarray(x)]
  else:
    h = _np(x) @ _np(model.embed.kernel[...])
  h = h + _np(model.pos[...])
  n = h.shape[1]
  for b in model.blocks:
    a = _ln(h, _np(b.ln1.scale[...]), _np(b.ln1.bias[...]))
    hs, p = b.num_heads, b.head_dim
    q, k, v = (( a @ _np(w.kernel[...])).reshape(a.shape[:2] + (hs, p))
               for w in (b.wq, b.wk, b.wv))
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(p)
    if causal:
      s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    w_ = np.exp(s - s.max(-1, keepdims=True))
    w_ /= w_.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", w_, v).reshape(a.shape[:2] + (hs * p,))
    h = h + o @ _np(b.wo.kernel[...])
    m = _ln(h, _np(b.ln2.scale[...]), _np(b.ln2.bias[...]))
    m = _gelu_tanh(m @ _np(b.fc1.kernel[...]) + _np(b.fc1.bias[...]))
    h = h + m @ _np(b.fc2.kernel[...]) + _np(b.fc2.bias[...])
  h = _ln(h, _np(model.ln_f.scale[...]), _np(model.ln_f.bias[...]))
  return h @ _np(model.readout.kernel[...]) + _np(model.readout.bias[...])


# ---------------------------------------------------------------- (a) fit

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
  cfg.mix.heads = cfg.lm.heads = ""
  res = study.run_study(cfg, str(tmp_path))
  err = res["fit"]["rel_error"]
  assert err["d_p=4"] < 1e-4, err
  assert err["d_p=1"] > 1e-2, err
  assert res["fit"]["min_error_below_n"] == err["d_p=1"]
  assert res["fit"]["max_error_at_or_above_n"] == err["d_p=4"]
  assert res["fit"]["exact_threshold"] in (None, 4)
  assert res["fit"]["tolerance"] == study.EXACT_TOL
  assert "mix" not in res and "lm" not in res


# ---------------------------------------------------------------- model

@pytest.mark.parametrize("causal,head_dim", [(False, None), (True, 3)])
def test_head_size_transformer_matches_numpy(causal, head_dim):
  kw = dict(seq_len=5, width=8, num_heads=4, head_dim=head_dim, out_dim=3,
            num_layers=2, causal=causal)
  if causal:
    model = rm.HeadSizeTransformer(vocab_size=11, rngs=nnx.Rngs(0), **kw)
    x = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  else:
    model = rm.HeadSizeTransformer(in_dim=3, rngs=nnx.Rngs(0), **kw)
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
  np.testing.assert_allclose(np.asarray(model(x)), _forward_np(model, x,
                                                               causal),
                             rtol=2e-4, atol=2e-4)
  logits = np.asarray(model.attention_logits(x), np.float64)
  assert logits.shape == (2, 2, 4, 5, 5)
  p = model.head_dim
  assert p == (2 if head_dim is None else 3)
  for mat in logits.reshape(-1, 5, 5):       # rank(X Wq Wk^T X^T) <= p
    assert np.linalg.matrix_rank(mat, tol=1e-4 * np.abs(mat).max()) <= p
  with pytest.raises(ValueError, match="width"):
    rm.HeadSizeTransformer(seq_len=5, width=10, num_heads=4, out_dim=3,
                           in_dim=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocab_size"):
    rm.HeadSizeTransformer(seq_len=5, width=8, num_heads=4, out_dim=3,
                           rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="seq_len"):
    model(x[:, :4])


def test_param_count_closed_form_and_matching():
  for kw in (dict(seq_len=16, width=64, num_heads=4, out_dim=4, in_dim=4),
             dict(seq_len=8, width=20, num_heads=8, head_dim=8, out_dim=256,
                  vocab_size=256, num_layers=2)):
    model = rm.HeadSizeTransformer(rngs=nnx.Rngs(0), **kw)
    assert count_params(model) == rm.head_size_transformer_params(**kw)
  base = dict(seq_len=16, out_dim=4, in_dim=4)
  # Standard: the budget does not depend on the number of heads.
  budgets = {rm.head_size_transformer_params(width=64, num_heads=h, **base)
             for h in (1, 2, 4, 8, 16)}
  assert len(budgets) == 1
  target = budgets.pop()
  for h in (2, 8, 16):
    w = rm.matched_width(target, num_heads=h, head_dim=16, **base)
    got = rm.head_size_transformer_params(width=w, num_heads=h, head_dim=16,
                                          **base)
    nxt = rm.head_size_transformer_params(width=w + 1, num_heads=h,
                                          head_dim=16, **base)
    prv = rm.head_size_transformer_params(width=w - 1, num_heads=h,
                                          head_dim=16, **base)
    assert abs(got - target) <= min(abs(nxt - target), abs(prv - target))
    assert abs(got - target) / target < 0.02
  # h * head = width: the fixed model is the standard one.
  assert rm.matched_width(target, num_heads=4, head_dim=16, **base) == 64
  rows = study.family([64], [4, 16], 16, **base)
  assert [(r[0], r[2], r[3]) for r in rows] == [
      ("standard", 64, 4), ("standard", 64, 16), ("fixed", 64, 4),
      ("fixed", rm.matched_width(target, num_heads=16, head_dim=16, **base),
       16)]


# ---------------------------------------------------------------- (b) mixing

def test_mixing_task_and_rank_measures():
  p = rm.mixing_matrices(jax.random.key(0), 3, 6, 2.0)
  v, y = rm.mixing_batch(jax.random.key(1), p, 4)
  pn, vn = _np(p), _np(v)
  ref = np.zeros((4, 6, 3))
  for b in range(4):
    for g in range(3):
      ref[b, :, g] = pn[g] @ vn[b, :, g]
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pn.sum(-1), 1.0, atol=1e-6)
  # The optimal attention is full rank: centred log P_g has rank n - 1.
  lp = np.log(pn)
  c = lp - lp.mean(-1, keepdims=True)
  assert [np.linalg.matrix_rank(m) for m in c] == [5, 5, 5]
  np.testing.assert_array_equal(np.asarray(rm.centred_logit_rank(
      jnp.log(p))), [5, 5, 5])
  # A rank-2 bilinear form plus row shifts has centred rank <= 2.
  a = np.random.default_rng(0).normal(size=(6, 2))
  low = a @ a.T + np.arange(6.0)[:, None]
  assert int(rm.centred_logit_rank(jnp.asarray(low, jnp.float32))) == 2
  # Effective rank: n for the identity, 1 for rank one, closed form else.
  np.testing.assert_allclose(float(rm.effective_rank(jnp.eye(5))), 5.0,
                             rtol=1e-5)
  np.testing.assert_allclose(float(rm.effective_rank(jnp.ones((5, 5)))), 1.0,
                             rtol=1e-4)
  m = np.diag([3.0, 1.0, 0.0])
  q = np.array([0.75, 0.25])
  np.testing.assert_allclose(float(rm.effective_rank(jnp.asarray(m))),
                             np.exp(-(q * np.log(q)).sum()), rtol=1e-5)


def test_attention_match_error():
  p = rm.mixing_matrices(jax.random.key(0), 2, 5, 2.0)
  u = jnp.full((5, 5), 0.2)
  attn = jnp.stack([jnp.stack([p[1], u, p[0]])] * 2)     # [B=2, H=3, 5, 5]
  assert float(study.attention_match_error(attn, p)) < 1e-6
  attn = jnp.stack([jnp.stack([u, u])])
  ref = np.mean([np.linalg.norm(0.2 - _np(p[g])) / np.linalg.norm(_np(p[g]))
                 for g in range(2)])
  np.testing.assert_allclose(float(study.attention_match_error(attn, p)),
                             ref, rtol=1e-5)


@pytest.mark.slow
def test_fixed_head_size_beats_standard_at_matched_params(tmp_path):
  """The bottleneck at small size: n = 6 tokens, G = h = 4 mixing matrices
  (one per head), budget = a width-16 standard model, whose head size
  16 / 4 = 4 is below n - 1 = 5. The fixed head size n = 6 at 4 heads,
  width matched to the same budget, learns the mixing better (measured:
  normalised MSE 7.9e-4 against 1.2e-3 after 3000 steps: a head size of
  n - 2 is only a mild bottleneck); its learned centred logits reach rank
  n - 1, the standard ones stay <= 4. Under CI 1000 steps (measured:
  5.9e-3 against 7.5e-3, the same logit ranks)."""
  cfg = configs.get_config("tiny")
  cfg.fit.head_sizes = cfg.lm.heads = ""
  cfg.mix.n = cfg.mix.fixed_head_size = 6
  cfg.mix.widths, cfg.mix.heads = "16", "4"
  cfg.mix.steps = 1000 if os.environ.get("CI") else 3000
  cfg.chunk, cfg.ckpt_every = 100, cfg.mix.steps
  cfg.mix.lr, cfg.mix.warmup = 1e-2, 100
  res = study.run_study(cfg, str(tmp_path))
  rows = {r["kind"]: r for r in res["mix"]["rows"]}
  std, fix = rows["standard"], rows["fixed"]
  assert abs(fix["params"] - std["params"]) / std["params"] < 0.05
  assert std["head_size"] == 4 and fix["head_size"] == 6
  assert std["groups"] == fix["groups"] == 4
  assert std["logit_rank_max"] <= 4
  assert fix["logit_rank_max"] == 5                     # n - 1
  assert res["mix"]["target_logit_rank_min"] == 5
  assert fix["nmse"] < std["nmse"], (fix, std)


# ---------------------------------------------------------------- (c) corpus

def test_stdlib_corpus_split_is_deterministic(tmp_path):
  names = [f"m{i:02d}.py" for i in range(7)]
  for i, name in enumerate(names):
    (tmp_path / name).write_bytes(bytes([65 + i]) * (10 + i))
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "x.py").write_bytes(b"ignored")
  c = study.stdlib_corpus(1000, 1000, 3, root=str(tmp_path))
  assert c["files"]["val"] == ["m02.py", "m05.py"]
  assert c["files"]["train"] == ["m00.py", "m01.py", "m03.py", "m04.py",
                                 "m06.py"]
  assert bytes(c["val"]) == b"C" * 12 + b"\0" + b"F" * 15 + b"\0"
  import hashlib
  assert c["sha256"]["val"] == hashlib.sha256(bytes(c["val"])).hexdigest()
  short = study.stdlib_corpus(15, 5, 3, root=str(tmp_path))
  assert bytes(short["train"]) == b"A" * 10 + b"\0" + b"B" * 4
  assert short["files"]["train"] == ["m00.py", "m01.py"]
  with pytest.raises(ValueError, match="val_every"):
    study.stdlib_corpus(10, 10, 1, root=str(tmp_path))
  real = study.stdlib_corpus(50_000, 10_000, 10)
  again = study.stdlib_corpus(50_000, 10_000, 10)
  assert len(real["train"]) == 50_000 and len(real["val"]) == 10_000
  assert real["sha256"] == again["sha256"]
  assert not set(real["files"]["train"]) & set(real["files"]["val"])
  w = np.asarray(study.lm_windows(real["val"], 8, 3))
  np.testing.assert_array_equal(w, np.asarray(real["val"][:27]).reshape(3, 9))


# ---------------------------------------------------------------- driver

def test_configs_docstring_and_helpfull():
  for preset in configs.PRESETS:
    cfg = configs.get_config(preset)
    assert cfg.ckpt_every % cfg.chunk == 0
    for part in (cfg.fit, cfg.mix, cfg.lm):
      assert part.steps % cfg.chunk == 0
    assert cfg.fit.d >= cfg.fit.n
    assert cfg.mix.fixed_head_size == cfg.mix.n
    assert cfg.lm.fixed_head_size == cfg.lm.seq_len
    common.validate_config(cfg, constraints=configs.CONSTRAINTS)
  assert "python -m experiments.low_rank_bottleneck" in configs.__doc__
  with pytest.raises(ValueError):
    configs.get_config("nope")
  text = common.describe_config(os.path.join(
      ROOT, "experiments", "configs", "low_rank_bottleneck.py"))
  for preset in configs.PRESETS:
    assert preset in text
  flat = common._flatten(configs.get_config().to_dict())
  for key in flat:
    assert key in text, key


def test_resume_identical_and_skips_finished_cells(tmp_path):
  # Under CI one cell of the sweep: the part (a) fit cell (the mixing and LM
  # cells go through the same sweep driver; the mixing cells are trained in
  # test_fixed_head_size_beats_standard_at_matched_params, the corpus split
  # is tested above), killed inside it, resumed, and run once more to check
  # it is skipped. Otherwise 5 cells (fit, 2 mixing, 2 LM), the kill inside
  # the 1st mixing cell.
  quick = bool(os.environ.get("CI"))
  def cfg_():
    c = configs.get_config("tiny")
    c.fit.head_sizes = "4"
    c.mix.heads = "" if quick else "2"
    c.lm.heads = "" if quick else "4"
    return c
  full = study.run_study(cfg_(), str(tmp_path / "full"))
  killed = str(tmp_path / "killed")
  c = cfg_()
  # fit (40 steps, checkpoints every 20) done, 1st mix cell at 10; under
  # CI the fit cell at 30, after its step-20 checkpoint
  c.stop_after_steps = 30 if quick else 50
  with pytest.raises(Stopped):
    study.run_study(c, killed)
  first = os.path.join(killed, "cells", "fit_dp4.json")
  assert os.path.exists(first) != quick
  if not quick:
    mtime = os.path.getmtime(first)
  resumed = study.run_study(cfg_(), killed)
  if quick:                # a third run: the finished cell is not retrained
    mtime = os.path.getmtime(first)
    assert study.run_study(cfg_(), killed)["fit"] == resumed["fit"]
  assert os.path.getmtime(first) == mtime
  def untimed(x):     # wall times differ between runs; numbers must not
    if isinstance(x, dict):
      return {k: untimed(v) for k, v in x.items() if not k.endswith("time_s")}
    if isinstance(x, list):
      return [untimed(v) for v in x]
    return x
  parts = ("fit",) if quick else ("fit", "mix", "lm")
  for part in parts:
    assert untimed(resumed[part]) == untimed(full[part])
  with open(os.path.join(killed, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if l.strip()]
  # fit 40 (+ 2 mix cells x 20 + 2 lm cells x 20) steps, chunk 10.
  assert steps == sorted(set(steps))
  assert len(steps) == (4 if quick else 12)
  pngs = ["fit_error.png"]
  if not quick:
    pngs += ["mix_vs_heads.png", "mix_vs_params.png", "mix_rank.png",
             "lm_vs_params.png", "lm_vs_heads.png"]
  for name in pngs:
    assert os.path.exists(os.path.join(killed, name))
  if not quick:
    assert "mix: standard" in study.format_tables(resumed)


@pytest.mark.slow
def test_colab_runs():
  from tests.notebook_runner import output_text, run_notebook
  nb = run_notebook(os.path.join(ROOT, "colabs",
                                 "low_rank_bottleneck.ipynb"), timeout=300)
  text = output_text(nb)
  assert "exact construction error" in text
  assert "fixed" in text
