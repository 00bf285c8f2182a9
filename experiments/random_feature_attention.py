r"""Random-feature attention vs a random-feature MLP: sample complexity.

Reproduces the simulations of Fu, Guo, Bai & Mei, "What can a Single
Attention Layer Learn? A Study Through the Random Features Lens" (NeurIPS
2023, arXiv 2307.11353).

Setup. A query x_0 and N keys x_1..x_N, i.i.d. uniform on the unit sphere
S^{d-1}, each with a constant 1 appended (x~ = [x; 1]). Targets are
permutation invariant in the keys, f(x_0, X) = (1/N) sum_i F(x_0, x_i), of
increasing complexity (see the config: key_linear, He_1..He_4 of
t_i = sqrt(d) <x_0, x_i>, bilinear_sq). Models, all linear in their
trainable weights on top of frozen random features, fitted by ridge
regression (closed form, the estimator the paper analyses) with the penalty
chosen on a validation split:

  rfa_zero      random-feature attention (`attnjax.models.random_feature_attention`),
                M heads, f = sum_m (1/N) sum_i relu(x~_0^T W_m x~_i) <v_m, x~_i>,
                W_m i.i.d. with zero-mean Gaussian entries; M * (d+1) values.
  rfa_identity  the same with identity-centred W_m = s * I_d (+0 on the
                appended constant) + Gaussian: the paper's non-zero-mean
                ("biased") sampling.
  rf_mlp        a standard two-layer random-feature network on the
                concatenated input [x~_0, x~_1, ..., x~_N] with M * (d+1)
                ReLU units (matched trainable parameter count).

Reported: test error (MSE / Var(y_test), so predicting the mean scores 1) vs
the training sample size n, per model and target, averaged over
`num_repeats` independent draws of data and features.

Run:
  python -m experiments.random_feature_attention --workdir=/tmp/rfa \
      [--config=experiments/configs/random_feature_attention.py:default]

Resume: every (repeat, model, n) cell is written to `DIR/cells/` as soon as it
finishes; a re-run with the same workdir loads finished cells instead of
recomputing them. All randomness derives from `config.seed`, so the same
seed gives the same numbers. (Training is closed-form, so there is no orbax
training state to checkpoint.)

`DIR/results.json` keys:
  config            the config used.
  sample_sizes, models, targets
  param_counts      {model: trainable parameters}.
  test_error        {model: {target: [mean rel. test error per n]}}.
  test_error_std    {model: {target: [std over repeats per n]}}.
  test_error_per_repeat  {model: {target: [[per n] per repeat]}}.
  ridge_lambda      {model: {target: [[chosen lambda per n] per repeat]}}.
  layer_check_max_abs_diff  max |ridge prediction - RandomFeatureAttention
                    layer output with the fitted values| over RFA cells.
  headline:
    error_at_max_n           {target: {model: error}} at the largest n.
    samples_to_reach         {target: {model: smallest n with error <=
                             error_threshold, or null}}.
    rf_mlp_over_rfa_zero_at_max_n        {target: ratio of errors}.
    rfa_zero_over_rfa_identity_at_max_n  {target: ratio of errors}.
    frac_cells_rfa_zero_beats_rf_mlp     over all (target, n) cells.
    frac_cells_rfa_identity_beats_rfa_zero
    rfa_beats_rf_mlp         bool: rfa_zero has lower mean error than rf_mlp
                             at the largest n on every target that either
                             of them learns (error < 0.9; where both stay
                             at ~1 neither is ahead).
    identity_mean_helps      bool: rfa_identity beats rfa_zero on every
                             He_k (k >= 2) target at the largest n.
    identity_loses_on        targets where rfa_identity is worse than
                             rfa_zero at the largest n (reported, not hidden).
  heads_axis        {"head_counts", "n" (= heads_n), "params" {M: M (d+1)},
                    "test_error" {model: {target: [mean per M]}},
                    "test_error_per_repeat"}: error vs the number of heads M
                    at fixed n (the RF-MLP gets M (d+1) units).
  slopes            {"vs_n"|"vs_heads": {model: {target: least-squares slope
                    of log error on log n (log M)}}}.
  wall_time_s       time of the invocation that wrote the file.
  cpu_time_s        CPU time (all threads) of the cells computed by it.
Figures: test_error_vs_n.png (one panel per target, fitted slopes in the
legend), test_error_<target>.png, test_error_vs_heads.png.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import app, flags, logging
from flax import nnx

from attnjax.models.random_feature_attention import RandomFeatureAttention
from experiments import common


MODEL_KINDS = {
    "rfa_zero": ("rfa", "zero"),
    "rfa_identity": ("rfa", "identity"),
    "rf_mlp": ("mlp", None),
}
TARGETS = ("key_linear", "he1", "he2", "he3", "he4", "bilinear_sq")


# ----------------------------------------------------------------------------
# Data.

def _sphere(rng: np.random.Generator, shape, d):
  x = rng.standard_normal(tuple(shape) + (d,))
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _hermite(k, t):
  return {1: t, 2: t ** 2 - 1, 3: t ** 3 - 3 * t,
          4: t ** 4 - 6 * t ** 2 + 3}[k]


def make_data(cfg, repeat: int):
  """Inputs (augmented, float32) and clean targets for all splits."""
  rng = np.random.default_rng([cfg.seed, repeat, 0])
  d, n_keys = cfg.dim, cfg.num_keys
  n_train = max(cfg.sample_sizes)
  n_all = n_train + cfg.num_val + cfg.num_test
  x0 = _sphere(rng, (n_all, 1), d)
  xs = _sphere(rng, (n_all, n_keys), d)
  beta = _sphere(rng, (), d)
  a = rng.standard_normal((d, d))
  a /= np.linalg.norm(a)
  t = np.sqrt(d) * np.einsum("bod,bnd->bn", x0, xs)
  ys = {}
  for name in cfg.targets:
    if name == "key_linear":
      f = np.sqrt(d) * xs @ beta
    elif name.startswith("he"):
      f = _hermite(int(name[2:]), t)
    elif name == "bilinear_sq":
      # E[(x^T A y)^2] = |A|_F^2 / d^2 for independent uniform unit x, y.
      f = d * np.einsum("bod,de,bne->bn", x0, a, xs) ** 2 - 1.0 / d
    else:
      raise ValueError(f"unknown target {name!r}; choose from {TARGETS}.")
    ys[name] = f.mean(-1)
  noise = rng.standard_normal(n_all) * cfg.label_noise
  one = np.ones
  q = np.concatenate([x0, one(x0.shape[:-1] + (1,))], -1).astype(np.float32)
  k = np.concatenate([xs, one(xs.shape[:-1] + (1,))], -1).astype(np.float32)
  splits = {"train": slice(0, n_train),
            "val": slice(n_train, n_train + cfg.num_val),
            "test": slice(n_train + cfg.num_val, n_all)}
  return dict(q=q, k=k, y=ys, noise=noise, splits=splits)


# ----------------------------------------------------------------------------
# Models: frozen random features.

def identity_mean(cfg):
  m = cfg.identity_mean_scale * np.eye(cfg.dim + 1, dtype=np.float32)
  m[-1, -1] = 0.0        # no mean on the appended constant coordinate
  return m


def build_rfa(cfg, model: str, repeat: int) -> RandomFeatureAttention:
  mean = "zero" if MODEL_KINDS[model][1] == "zero" else identity_mean(cfg)
  seed = int(jax.random.randint(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), repeat),
                         list(MODEL_KINDS).index(model) + 1), (), 0, 2**30))
  return RandomFeatureAttention(
      cfg.num_heads, cfg.dim + 1, 1, qk_mean=mean, qk_std=cfg.qk_std,
      nonlinearity=cfg.nonlinearity, rngs=nnx.Rngs(seed))


def param_counts(cfg) -> Dict[str, int]:
  return {m: cfg.num_heads * (cfg.dim + 1) for m in cfg.models}


def model_features(cfg, model: str, repeat: int, data, layer=None):
  """float32 features [n_all, p] of one model (p = M * (d + 1)); each ridge
  cell casts its slice to float64 (the Gram matrix and its solves are where
  the precision matters)."""
  q, k = data["q"], data["k"]
  n_all = q.shape[0]
  bs = cfg.feature_batch
  if MODEL_KINDS[model][0] == "rfa":
    feat_fn = jax.jit(lambda qq, kk: layer.features(qq, kk))
    out = [np.asarray(feat_fn(q[i:i + bs], k[i:i + bs])).reshape(
        min(bs, n_all - i), -1) for i in range(0, n_all, bs)]
    return np.concatenate(out).astype(np.float32)
  # Random-feature MLP on the concatenated input, width = matched params.
  u = np.concatenate([q.reshape(n_all, -1), k.reshape(n_all, -1)], -1)
  width = cfg.num_heads * (cfg.dim + 1)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed),
                                              repeat), 1000)
  w = jax.random.normal(key, (u.shape[1], width), jnp.float32)
  w = w / np.sqrt(u.shape[1])
  fn = jax.jit(lambda uu: jax.nn.relu(uu @ w))
  out = [np.asarray(fn(u[i:i + bs])) for i in range(0, n_all, bs)]
  return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------
# Ridge regression along a penalty path (one Cholesky solve per penalty).

def ridge_cost(n: int, p: int, num_lambdas: int) -> float:
  """Work units (GFLOP, roughly) of one ridge cell: the Gram matrix plus one
  Cholesky factorization per penalty (used for a truthful ETA)."""
  k = min(n, p)
  return (2.0 * n * p * k + num_lambdas * k ** 3 / 3.0) / 1e9


def ridge_cell(cfg, feats, data, n: int):
  """Fits every target at sample size n; returns per-target results.

  The features are centred on the first n training rows, the penalty path
  is relative to trace(A^T A), and every penalty is one Cholesky
  factorization of the float64 Gram matrix (dual n x n when n <= p, primal
  p x p above) shared by all targets (a multi-column right-hand side).
  On a CPU the 9 factorizations of the default path cost about a third of
  one symmetric eigendecomposition (measured at p = 2176: 0.52 vs 16.1
  CPU-seconds per factorization / eigendecomposition).
  """
  sp = data["splits"]
  a = np.asarray(feats[sp["train"]][:n], np.float64)
  mu = a.mean(0)
  a -= mu
  fv = np.asarray(feats[sp["val"]], np.float64) - mu
  ft = np.asarray(feats[sp["test"]], np.float64) - mu
  n_, p = a.shape
  targets = list(cfg.targets)
  noise = data["noise"]
  y = np.stack([data["y"][t][sp["train"]][:n] + noise[sp["train"]][:n]
                for t in targets], 1)                        # [n, T]
  yv = np.stack([data["y"][t][sp["val"]] + noise[sp["val"]]
                 for t in targets], 1)
  yt = np.stack([data["y"][t][sp["test"]] for t in targets], 1)
  ybar = y.mean(0)
  yc = y - ybar
  dual = n_ <= p
  g = a @ a.T if dual else a.T @ a                           # [k, k]
  scale = float(np.trace(g))      # makes lambda scale-free
  rhs = yc if dual else a.T @ yc                             # [k, T]
  var_v = yv.var(0)
  best = [None] * len(targets)
  for lam in cfg.ridge_lambdas:
    m = g.copy()
    m.flat[::m.shape[0] + 1] += lam * scale
    try:
      cf = scipy.linalg.cho_factor(m, lower=True, overwrite_a=True,
                                   check_finite=False)
    except np.linalg.LinAlgError:
      continue                    # not numerically positive definite
    sol = scipy.linalg.cho_solve(cf, rhs, check_finite=False)
    w = a.T @ sol if dual else sol                           # [p, T]
    val = np.mean((fv @ w + ybar - yv) ** 2, 0) / var_v
    for j in range(len(targets)):
      if best[j] is None or val[j] < best[j][0]:
        best[j] = (float(val[j]), lam, w[:, j].copy())
  out = {}
  for j, name in enumerate(targets):
    if best[j] is None:
      raise np.linalg.LinAlgError(
          f"no ridge penalty in {tuple(cfg.ridge_lambdas)} gave a positive "
          f"definite system at n={n}, p={p}.")
    val, lam, w = best[j]
    pred_t = ft @ w + ybar[j]
    test = float(np.mean((pred_t - yt[:, j]) ** 2) / np.var(yt[:, j]))
    out[name] = dict(test_error=test, val_error=val, ridge_lambda=lam,
                     weights=w, offset=float(ybar[j] - mu @ w))
  return out


def layer_check(layer, data, cell, name):
  """Max |layer(x) + offset - ridge prediction| on the test split."""
  sp = data["splits"]
  q, k = data["q"][sp["test"]][:256], data["k"][sp["test"]][:256]
  res = cell[name]
  layer.set_values_from_flat(res["weights"].astype(np.float32))
  out = np.asarray(layer(q, k))[:, 0, 0] + res["offset"]
  return out


# ----------------------------------------------------------------------------
# Driver.

def _cell_path(workdir, repeat, model, n, heads=None):
  tag = f"n{n}" if heads is None else f"n{n}_M{heads}"
  return os.path.join(workdir, "cells", f"r{repeat}_{model}_{tag}.json")


def head_counts(cfg):
  """The M values of the heads axis (each <= num_heads), sorted."""
  hs = sorted(int(h) for h in cfg.head_counts)
  if any(h < 1 or h > cfg.num_heads for h in hs):
    raise ValueError(f"config.head_counts must lie in [1, num_heads="
                     f"{cfg.num_heads}]; got {tuple(cfg.head_counts)}.")
  return hs


def fit_slope(xs, ys) -> float:
  """Least-squares slope of log(y) on log(x) (a power law y ~ x^slope)."""
  xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
  ok = ys > 0
  if ok.sum() < 2:
    return float("nan")
  return float(np.polyfit(np.log(xs[ok]), np.log(ys[ok]), 1)[0])


def _write_cell(path, rec):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(common.to_jsonable(rec), f)
  os.replace(tmp, path)


def run(cfg, workdir: str):
  """Runs (or resumes) the study; returns (results, stats).

  Cells: (repeat, model, n) on the sample-size axis with all M heads, and
  (repeat, model, M') on the heads axis at n = heads_n, whose features are
  the first M' heads' columns of the same feature matrix (the features of
  a head do not depend on the others), so each (repeat, model) computes
  its features once and every target reuses them.
  """
  t0 = time.time()
  for m in cfg.models:
    if m not in MODEL_KINDS:
      raise ValueError(f"unknown model {m!r}; choose from {list(MODEL_KINDS)}.")
  os.makedirs(os.path.join(workdir, "cells"), exist_ok=True)
  sizes = sorted(cfg.sample_sizes)
  hcounts = head_counts(cfg)
  hn = int(cfg.heads_n)
  if hcounts and hn > max(sizes):
    raise ValueError(f"config.heads_n ({hn}) must be <= the largest sample "
                     f"size ({max(sizes)}).")
  cells = [(r, m, n, None) for r in range(cfg.num_repeats)
           for m in cfg.models for n in sizes]
  cells += [(r, m, hn, h) for r in range(cfg.num_repeats)
            for m in cfg.models for h in hcounts]
  done = {c: _cell_path(workdir, *c) for c in cells}
  todo = [c for c in cells if not os.path.exists(done[c])]
  width = cfg.dim + 1
  nl = len(cfg.ridge_lambdas)

  def cost(c):
    p = (cfg.num_heads if c[3] is None else c[3]) * width
    return 0.0 if _reused(c) else ridge_cost(c[2], p, nl)

  def _reused(c):
    # The heads-axis cell with all M heads at n = heads_n is the same fit as
    # the sample-size cell at that n: copied, not recomputed.
    return c[3] == cfg.num_heads and c[2] in sizes
  total = sum(cost(c) for c in cells)
  units = total - sum(cost(c) for c in todo)
  progress = common.Progress(max(total, 1e-9), start=units, every=0,
                             desc="rfa cells", unit="GFLOP")
  computed = 0
  cpu0 = time.process_time()
  for r in range(cfg.num_repeats):
    need = [c for c in todo if c[0] == r]
    if not need:
      continue
    data = make_data(cfg, r)
    for m in cfg.models:
      mine = [c for c in need if c[1] == m]
      if not mine:
        continue
      layer = build_rfa(cfg, m, r) if MODEL_KINDS[m][0] == "rfa" else None
      feats = model_features(cfg, m, r, data, layer)
      for c in mine:
        (_, _, n, h) = c
        if _reused(c):
          with open(done[(r, m, n, None)]) as fh:
            rec = json.load(fh)
          _write_cell(done[c], rec)
          computed += 1
          continue
        f = feats if h is None else feats[:, :h * width]
        cell = ridge_cell(cfg, f, data, n)
        rec = {t: {k: v for k, v in res.items() if k != "weights"}
               for t, res in cell.items()}
        if layer is not None and h is None:
          # The fitted values, written into the NNX layer, must reproduce
          # the ridge predictions.
          sp = data["splits"]
          ft = feats[sp["test"]][:256]
          for t in cfg.targets:
            ref = ft @ cell[t]["weights"] + cell[t]["offset"]
            got = layer_check(layer, data, cell, t)
            rec[t]["layer_check_max_abs_diff"] = float(np.max(np.abs(got - ref)))
        _write_cell(done[c], rec)
        computed += 1
        units += cost(c)
        progress.update(units, cells=len(cells) - len(todo) + computed,
                        cpu_s=time.process_time() - cpu0,
                        **{f"err_{t}": rec[t]["test_error"]
                           for t in cfg.targets[:2]})
  results = aggregate(cfg, workdir, sizes)
  results["wall_time_s"] = time.time() - t0
  results["cpu_time_s"] = time.process_time() - cpu0
  common.write_results(workdir, results)
  make_figures(cfg, workdir, results)
  return results, {"cells_computed": computed, "cells_total": len(cells)}


def aggregate(cfg, workdir, sizes):
  models, targets = list(cfg.models), list(cfg.targets)
  per = {m: {t: [] for t in targets} for m in models}
  lams = {m: {t: [] for t in targets} for m in models}
  diff = 0.0
  for r in range(cfg.num_repeats):
    for m in models:
      rows = {t: [] for t in targets}
      lrow = {t: [] for t in targets}
      for n in sizes:
        with open(_cell_path(workdir, r, m, n)) as f:
          rec = json.load(f)
        for t in targets:
          rows[t].append(rec[t]["test_error"])
          lrow[t].append(rec[t]["ridge_lambda"])
          diff = max(diff, rec[t].get("layer_check_max_abs_diff", 0.0))
      for t in targets:
        per[m][t].append(rows[t])
        lams[m][t].append(lrow[t])
  mean = {m: {t: np.mean(per[m][t], 0).tolist() for t in targets}
          for m in models}
  std = {m: {t: np.std(per[m][t], 0).tolist() for t in targets}
         for m in models}
  head = {"error_at_max_n": {t: {m: mean[m][t][-1] for m in models}
                             for t in targets},
          "samples_to_reach": {}, "error_threshold": cfg.error_threshold}
  for t in targets:
    head["samples_to_reach"][t] = {}
    for m in models:
      hit = [n for n, e in zip(sizes, mean[m][t]) if e <= cfg.error_threshold]
      head["samples_to_reach"][t][m] = hit[0] if hit else None
  if "rfa_zero" in models and "rf_mlp" in models:
    head["rf_mlp_over_rfa_zero_at_max_n"] = {
        t: mean["rf_mlp"][t][-1] / mean["rfa_zero"][t][-1] for t in targets}
    wins = [a < b for t in targets
            for a, b in zip(mean["rfa_zero"][t], mean["rf_mlp"][t])]
    head["frac_cells_rfa_zero_beats_rf_mlp"] = float(np.mean(wins))
    learnable = [t for t in targets
                 if min(mean["rfa_zero"][t][-1], mean["rf_mlp"][t][-1]) < 0.9]
    head["rfa_beats_rf_mlp"] = bool(learnable) and bool(all(
        mean["rfa_zero"][t][-1] < mean["rf_mlp"][t][-1] for t in learnable))
  if "rfa_zero" in models and "rfa_identity" in models:
    head["rfa_zero_over_rfa_identity_at_max_n"] = {
        t: mean["rfa_zero"][t][-1] / mean["rfa_identity"][t][-1]
        for t in targets}
    wins = [a < b for t in targets
            for a, b in zip(mean["rfa_identity"][t], mean["rfa_zero"][t])]
    head["frac_cells_rfa_identity_beats_rfa_zero"] = float(np.mean(wins))
    hk = [t for t in targets if t.startswith("he") and int(t[2:]) >= 2]
    head["identity_mean_helps"] = bool(hk) and bool(all(
        mean["rfa_identity"][t][-1] < mean["rfa_zero"][t][-1] for t in hk))
  # Heads axis at n = heads_n.
  hcounts = head_counts(cfg)
  hper = {m: {t: [] for t in targets} for m in models}
  for r in range(cfg.num_repeats):
    for m in models:
      rows = {t: [] for t in targets}
      for h in hcounts:
        with open(_cell_path(workdir, r, m, int(cfg.heads_n), h)) as f:
          rec = json.load(f)
        for t in targets:
          rows[t].append(rec[t]["test_error"])
      for t in targets:
        hper[m][t].append(rows[t])
  hmean = {m: {t: (np.mean(hper[m][t], 0).tolist() if hcounts else [])
               for t in targets} for m in models}
  heads_axis = {"head_counts": hcounts, "n": int(cfg.heads_n),
                "params": {str(h): h * (cfg.dim + 1) for h in hcounts},
                "test_error": hmean, "test_error_per_repeat": hper}
  slopes = {"vs_n": {m: {t: fit_slope(sizes, mean[m][t]) for t in targets}
                     for m in models},
            "vs_heads": {m: {t: (fit_slope(hcounts, hmean[m][t])
                                 if len(hcounts) > 1 else None)
                             for t in targets} for m in models}}
  head["identity_loses_on"] = (
      [t for t in targets
       if mean["rfa_identity"][t][-1] > mean["rfa_zero"][t][-1]]
      if "rfa_zero" in models and "rfa_identity" in models else [])
  return {"config": cfg.to_dict(), "sample_sizes": sizes, "models": models,
          "targets": targets, "param_counts": param_counts(cfg),
          "test_error": mean, "test_error_std": std,
          "test_error_per_repeat": per, "ridge_lambda": lams,
          "layer_check_max_abs_diff": diff, "heads_axis": heads_axis,
          "slopes": slopes, "headline": head}


STYLE = {"rfa_zero": ("C0", "o", "RFA, zero-mean W"),
         "rfa_identity": ("C1", "s", "RFA, identity-centred W"),
         "rf_mlp": ("C2", "^", "RF-MLP (matched params)")}


def _panel(ax, results, target, ylabel=True):
  sizes = results["sample_sizes"]
  for m in results["models"]:
    c, mk, label = STYLE.get(m, ("k", "x", m))
    mu = np.asarray(results["test_error"][m][target])
    sd = np.asarray(results["test_error_std"][m][target])
    sl = results["slopes"]["vs_n"][m][target]
    ax.plot(sizes, mu, marker=mk, color=c, label=f"{label} (slope {sl:.2f})")
    ax.fill_between(sizes, np.maximum(mu - sd, 1e-4), mu + sd, color=c,
                    alpha=0.15)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("training samples n")
  if ylabel:
    ax.set_ylabel("test MSE / Var(y)")
  ax.set_title(target)
  ax.grid(True, which="both", alpha=0.3)


def make_figures(cfg, workdir, results):
  plt = common.setup_matplotlib()
  targets = results["targets"]
  fig, axes = plt.subplots(1, len(targets), figsize=(4 * len(targets), 3.4),
                           squeeze=False)
  for i, (ax, t) in enumerate(zip(axes[0], targets)):
    _panel(ax, results, t, ylabel=i == 0)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"Random-feature attention (d={cfg.dim}, N={cfg.num_keys}, "
               f"M={cfg.num_heads}) vs RF-MLP", y=1.03)
  fig.tight_layout()
  common.save_figure(fig, workdir, "test_error_vs_n.png")
  for t in targets:
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    _panel(ax, results, t)
    ax.legend(fontsize=8)
    common.save_figure(fig, workdir, f"test_error_{t}.png")
  ha = results["heads_axis"]
  if len(ha["head_counts"]) > 1:
    fig, axes = plt.subplots(1, len(targets),
                             figsize=(4 * len(targets), 3.4), squeeze=False)
    for i, (ax, t) in enumerate(zip(axes[0], targets)):
      for m in results["models"]:
        c, mk, label = STYLE.get(m, ("k", "x", m))
        sl = results["slopes"]["vs_heads"][m][t]
        ax.plot(ha["head_counts"], ha["test_error"][m][t], marker=mk,
                color=c, label=f"{label} (slope {sl:.2f})")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("heads M (RF-MLP: M (d+1) units)")
      if i == 0:
        ax.set_ylabel("test MSE / Var(y)")
      ax.set_title(f"{t}, n = {ha['n']}")
      ax.grid(True, which="both", alpha=0.3)
      ax.legend(fontsize=6)
    fig.tight_layout()
    common.save_figure(fig, workdir, "test_error_vs_heads.png")


def main(argv):
  del argv
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  cfg = flags.FLAGS.config
  common.guard_config(flags.FLAGS.workdir, cfg)
  results, stats = run(cfg, flags.FLAGS.workdir)
  logging.info("cells computed this run: %d / %d", stats["cells_computed"],
               stats["cells_total"])
  print(json.dumps(common.to_jsonable(results["headline"]), indent=1))


if __name__ == "__main__":
  common.define_study_flags("random_feature_attention.py")
  app.run(main)
