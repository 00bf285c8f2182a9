r"""Low-rank bottleneck in multi-head attention (Bhojanapalli et al. 2020).

Paper: S. Bhojanapalli, C. Yun, A. S. Rawat, S. Reddi, S. Kumar, "Low-Rank
Bottleneck in Multi-head Attention Models", ICML 2020 (arXiv 2002.07028).

(a) Representation. A head with head size d_p computes
P_hat = softmax(X W_q W_k^T X^T) on n tokens X [n, d]. The paper (tokens as
columns, column-wise softmax, hence *column*-stochastic P) shows a head can
represent every positive stochastic n x n matrix when d_p >= n and not when
d_p < n. Here, in attnjax's layout (rows = queries, row-wise softmax, so P is
row-stochastic: the transpose of the paper's convention, same statement),
for each d_p we fit W_q, W_k in R^{d x d_p} by Adam on the row-wise
cross-entropy to random positive stochastic P (rows softmax of Gaussian
logits), `trials` independent (X, P) pairs per d_p. Softmax is invariant to
adding a constant to each row of logits, so log P + c 1^T can be brought to
rank n - 1: in exact arithmetic d_p = n - 1 already represents every
positive stochastic P (the paper's threshold n is sufficient, n - 1 is the
exact one). "Exact" here means a mean relative Frobenius error
||P_hat - P||_F / ||P||_F below EXACT_TOL = 1e-5 after `fit.steps` Adam
steps in float32 (`fit.exact_threshold` is the smallest d_p meeting it).
Gradient fitting converges slowly at d_p = n - 1 (the optimum needs the
per-row shifts c to be found too), so at the default budget d_p = n - 1
reaches ~1e-4, below 1e-5 only at d_p >= n, while the error stays bounded
away from 0 for d_p < n - 1 (0.72 at d_p = 1, 3e-2 at d_p = 8 for n = 16).

(b) Full-rank mixing task, parameter matched. G fixed random positive
stochastic n x n matrices P_g (`mixing_matrices`); token j carries G
Gaussian values v_j; the target of token i, channel g, is
sum_j P_g[i, j] v_j^(g) (`mixing_batch`). The optimal one-layer model has
one head per group whose attention matrix is P_g, and the centred logits
log P_g - rowmean have rank n - 1 (`mix.target_logit_rank_min` checks it
numerically), so a head of size < n - 1 cannot produce P_g (part (a)).
By default G = h (`mix.groups = 0`): every head must produce its own
P_g. With fewer groups than heads a group can be served by a linear
combination of several low-rank heads, which approximates P_g well: a
probe with G = 4, n = 8, width 32 reached normalised MSE 3.5e-3 with 16
heads of size 2 against 1.8e-3 with 4 heads of size 8 (2000 steps), so
G < h does not exhibit the bottleneck.
Models: `attnjax.models.rank_models.HeadSizeTransformer` (pre-LN, one
layer, GELU MLP 4x, learned positions, linear in/out). For each width D of
`mix.widths` the standard model (head size D / h) runs at every h of
`mix.heads`; its parameter count does not depend on h. The fixed-head-size
model (head size `mix.fixed_head_size`, = n by default, the paper's
remedy) runs at the same h with its width chosen by `matched_width` so its
total parameter count matches the standard model's at width D (within a
few percent, widths being integers; `params` in the results). Metric:
normalised MSE (MSE / mean y^2) on a fixed evaluation set. Rank of the learned attention:
on `mix.rank_examples` evaluation inputs, per head, the numerical rank of
the row-centred logits (singular values above `mix.rank_rtol` times the
largest; <= head size by construction, n - 1 needed), the effective rank
(exp entropy of the normalised singular values, Roy & Vetterli) of the
softmax matrices against that of P_g, and the attention match error
mean_g min_h ||A_h - P_g||_F / ||P_g||_F (does some head learn P_g?).

(c) Offline character-level language model (the paper's LM1B experiment
scaled to a CPU). Corpus: the Python standard library's own top-level .py
files (`stdlib_corpus`: sorted by name, every `lm.val_every`-th file held
out for validation, bytes as tokens, vocabulary 256; no download; the
Python version and a SHA-256 of each split are recorded, since the corpus
differs between Python versions). Causal `HeadSizeTransformer` with
context `lm.seq_len`, standard (width D, head size D / h) against fixed
head size `lm.fixed_head_size` (= seq_len by default) at matched
parameters, as in (b). Metric: validation bits per character on fixed
non-overlapping windows.

The associative-recall task of earlier versions was dropped: recall does
not need rank-n attention (head size 8 < n = 17 reached 0.994 accuracy)
and its "fixed" model had 3x the parameters of the standard one.

Run (see experiments/configs/low_rank_bottleneck.py for all presets):

  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_default

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run.
"data:-1" (or "data:4", ...) is data parallel: each step's batch, sampled
inside the jitted loop, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; parameters
and Adam state are replicated, or sharded over `--config.fsdp_axis=data`
(only arrays of >= 2**14 elements). config.mix.batch_size and config.lm.batch_size must be
divisible by the `data` axis size (the fit cells have no batch: their work
is replicated). Other mesh axes are not used (the work is replicated over
them). Numbers equal the single-device run up to float summation order
(sharded reductions). Checkpoints restore into whatever mesh the resuming
run uses, so a cell started on N devices can be finished on M. Multi-host:
`sharding.maybe_initialize_distributed()` picks up SLURM / Open MPI / TPU /
JAX_COORDINATOR_ADDRESS environments.

Outputs in --workdir:
  results.json keys:
    fit.n, fit.head_sizes         sequence length and the d_p swept
    fit.rel_error                 {"d_p=<p>": mean over trials of
                                  ||P_hat - P||_F / ||P||_F}
    fit.max_abs_error             {"d_p=<p>": max |P_hat - P| over trials}
    fit.kl                        {"d_p=<p>": mean row KL(P || P_hat)}
    fit.exact_threshold           smallest d_p with rel_error < 1e-5 (null
                                  if none)
    fit.min_error_below_n         min rel_error over d_p < n
    fit.max_error_at_or_above_n   max rel_error over d_p >= n
    mix.n, mix.groups             task size (groups 0: G = h per cell)
    mix.target_logit_rank_min     smallest numerical rank (rtol) of the
                                  row-centred log P_g used (n - 1 expected)
    mix.target_eff_rank           {G: mean effective rank of the P_g}
    mix.rows                      one row per cell: kind ("standard" |
                                  "fixed"), budget_width (the standard
                                  width it is matched to), width, heads,
                                  groups,
                                  head_size, params, nmse, logit_rank_mean,
                                  logit_rank_max, attn_eff_rank,
                                  match_error, train_loss_final
    lm.corpus                     python version, files, bytes and sha256
                                  of the train / validation splits
    lm.rows                       as mix.rows with val_bpc (validation bits
                                  per character) instead of nmse and no
                                  rank columns
    config, wall_time_s           (config includes mesh and fsdp_axis)
  fit_error.png      relative fit error vs head size d_p (log y), n marked
  mix_vs_heads.png   normalised MSE vs heads, one curve per family/budget
  mix_vs_params.png  normalised MSE vs parameters (the paper's Table 1 axis)
  mix_rank.png       learned centred-logit rank vs heads (n - 1 marked)
  lm_vs_params.png   validation bits/char vs parameters
  lm_vs_heads.png    validation bits/char vs heads
  metrics.jsonl, cells/<cell>.json, checkpoints/<cell>/  (written by the
                     resumable `train_cells` driver of experiments/sweep.py,
                     shared with experiments/benefits_of_rank.py)

Each of (a), (b), (c) is skipped when its sweep list (fit.head_sizes,
mix.heads, lm.heads) is empty.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from flax import nnx

from attnjax.models.rank_models import (HeadSizeTransformer,
                                        centred_logit_rank, effective_rank,
                                        head_size_transformer_params,
                                        matched_width, mixing_batch,
                                        mixing_matrices)
from attnjax.softmax import attention_weights
from experiments import common, sharding
from experiments.sweep import Cell, Stopped, ints, train_cells


EXACT_TOL = 1e-5


# ----------------------------------------------------------------------------
# (a) Representation: fit a head to given attention matrices.
# ----------------------------------------------------------------------------

def fit_problem(key, trials: int, n: int, d: int, logit_scale: float):
  """Random (X [trials, n, d], P [trials, n, n] row-stochastic, positive)."""
  kx, kp = jax.random.split(key)
  x = jax.random.normal(kx, (trials, n, d)) / jnp.sqrt(d)
  p = jax.nn.softmax(logit_scale * jax.random.normal(kp, (trials, n, n)),
                     axis=-1)
  return x, p


def head_probs(x, wq, wk):
  """softmax(X W_q (X W_k)^T) per trial via attnjax.attention_weights."""
  q = jnp.einsum("tnd,tdp->tnp", x, wq)[:, :, None, :]   # [B, T, 1, d_p]
  k = jnp.einsum("tnd,tdp->tnp", x, wk)[:, :, None, :]
  return attention_weights(q, k, scale=1.0)[:, 0]          # [B, T, S]


class HeadFit(nnx.Module):
  """Trainable W_q, W_k [trials, d, d_p] for fixed (X, P) problems."""

  def __init__(self, x, p, head_size: int, *, rngs: nnx.Rngs):
    trials, _, d = x.shape
    init = nnx.initializers.normal(1.0)
    self.wq = nnx.Param(init(rngs.params(), (trials, d, head_size)))
    self.wk = nnx.Param(init(rngs.params(), (trials, d, head_size)))
    self.x = nnx.Variable(x)
    self.p = nnx.Variable(p)

  def probs(self):
    return head_probs(self.x[...], self.wq[...], self.wk[...])


def fit_metrics(p_hat, p) -> Dict[str, jax.Array]:
  rel = (jnp.linalg.norm(p_hat - p, axis=(-2, -1))
         / jnp.linalg.norm(p, axis=(-2, -1)))
  kl = jnp.sum(p * (jnp.log(p) - jnp.log(jnp.maximum(p_hat, 1e-30))), -1)
  return {"rel_error": jnp.mean(rel),
          "max_abs_error": jnp.max(jnp.abs(p_hat - p)),
          "kl": jnp.mean(kl)}


def exact_construction(x, p):
  """Closed-form head with d_p = n reproducing P exactly (d >= n).

  Logits L = log P; A = X^+ L X^{+T} satisfies X A X^T = L when X [n, d]
  has rank n; factor A = W_q W_k^T with W_q = U S, W_k = V (thin SVD).
  Independent of the gradient fit; used as a reference in tests.
  """
  xp = jnp.linalg.pinv(x)                                    # [d, n]
  a = xp @ jnp.log(p) @ xp.T
  u, s, vt = jnp.linalg.svd(a, full_matrices=False)
  n = x.shape[0]
  return u[:, :n] * s[:n], vt[:n].T


def fit_cells(cfg) -> List[Cell]:
  f = cfg.fit
  x, p = fit_problem(jax.random.fold_in(jax.random.key(cfg.seed), 7),
                     int(f.trials), int(f.n), int(f.d), float(f.logit_scale))
  cells = []
  for hs in ints(f.head_sizes):
    seed = cfg.seed * 1_000_003 + 17 * hs

    def make_model(hs=hs, seed=seed):
      return HeadFit(x, p, hs, rngs=nnx.Rngs(seed))

    def loss_fn(model, batch):
      del batch
      p_hat = model.probs()
      return -jnp.mean(jnp.sum(
          model.p[...] * jnp.log(jnp.maximum(p_hat, 1e-30)), axis=-1))

    def eval_fn(model):
      return fit_metrics(model.probs(), model.p[...])

    cells.append(Cell(name=f"fit_dp{hs}", make_model=make_model,
                      loss_fn=loss_fn, batch_fn=lambda key: (),
                      eval_fn=eval_fn, steps=int(f.steps), lr=float(f.lr),
                      seed=seed, info={"head_size": hs}))
  return cells


# ----------------------------------------------------------------------------
# Parameter-matched standard / fixed-head-size families.
# ----------------------------------------------------------------------------

def family(widths, heads, fixed_head_size: int, **model_kw):
  """[(kind, budget_width, width, heads, head_dim or None, params)].

  Standard: width D, head size D / h (h must divide D), for every D and h.
  Fixed: head size `fixed_head_size`, width matched (`matched_width`) to
  the standard model's parameter count at width D (which is the same for
  every h).
  """
  rows = []
  for d in widths:
    budget = head_size_transformer_params(width=d, num_heads=1, **model_kw)
    for h in heads:
      if d % h == 0:
        rows.append(("standard", d, d, h, None, budget))
    for h in heads:
      w = matched_width(budget, num_heads=h, head_dim=fixed_head_size,
                        hi=4 * d, **model_kw)
      rows.append(("fixed", d, w, h, fixed_head_size,
                   head_size_transformer_params(
                       width=w, num_heads=h, head_dim=fixed_head_size,
                       **model_kw)))
  return rows


def _cell_name(prefix, kind, budget, h):
  return f"{prefix}_{kind}_D{budget}_h{h}"


# ----------------------------------------------------------------------------
# (b) Full-rank mixing task.
# ----------------------------------------------------------------------------

def mix_groups(cfg, heads: int) -> int:
  """G of a cell: `mix.groups`, or the cell's number of heads when 0."""
  return int(cfg.mix.groups) or heads


def mix_targets(cfg, groups: int):
  m = cfg.mix
  key = jax.random.fold_in(jax.random.key(cfg.seed), 13)
  return mixing_matrices(jax.random.fold_in(key, groups), groups, int(m.n),
                         float(m.logit_scale))


def attention_match_error(attn, p):
  """mean_g min_h mean_b ||attn[b, h] - P_g||_F / ||P_g||_F.

  attn [B, H, n, n] (one layer's softmax matrices), p [G, n, n]."""
  diff = attn[:, :, None] - p[None, None]                  # [B, H, G, n, n]
  rel = (jnp.linalg.norm(diff, axis=(-2, -1))
         / jnp.linalg.norm(p, axis=(-2, -1))[None, None])  # [B, H, G]
  return jnp.mean(jnp.min(jnp.mean(rel, 0), axis=0))


def mix_cells(cfg) -> List[Cell]:
  m = cfg.mix
  n = int(m.n)
  rtol, nr = float(m.rank_rtol), int(m.rank_examples)
  cells = []
  for budget in ints(m.widths):
    for h in ints(m.heads):
      g = mix_groups(cfg, h)
      p = mix_targets(cfg, g)
      ev_v, ev_y = mixing_batch(
          jax.random.fold_in(jax.random.key(cfg.seed), 17), p,
          int(m.eval_batch))
      kw = dict(seq_len=n, out_dim=g, in_dim=g, num_layers=int(m.num_layers))
      for kind, _, width, _, hd, params in family(
          [budget], [h], int(m.fixed_head_size), **kw):
        seed = (cfg.seed * 1_000_003 + 31 * h + 7 * budget
                + (0 if hd is None else 5))

        def make_model(width=width, h=h, hd=hd, seed=seed, kw=kw):
          return HeadSizeTransformer(width=width, num_heads=h, head_dim=hd,
                                     rngs=nnx.Rngs(seed), **kw)

        def loss_fn(model, batch):
          v, y = batch
          return jnp.mean((model(v) - y) ** 2)

        def batch_fn(key, p=p):
          return mixing_batch(key, p, int(m.batch_size))

        @nnx.jit
        def eval_fn(model, p=p, ev_v=ev_v, ev_y=ev_y):
          pred = model(ev_v)
          logits = model.attention_logits(ev_v[:nr])[0]      # [B, H, n, n]
          ranks = centred_logit_rank(logits, rtol)
          attn = jax.nn.softmax(logits, axis=-1)
          return {"nmse": jnp.mean((pred - ev_y) ** 2) / jnp.mean(ev_y ** 2),
                  "logit_rank_mean": jnp.mean(ranks.astype(jnp.float32)),
                  "logit_rank_max": jnp.max(ranks),
                  "attn_eff_rank": jnp.mean(effective_rank(attn)),
                  "match_error": attention_match_error(attn, p)}

        cells.append(Cell(
            name=_cell_name("mix", kind, budget, h), make_model=make_model,
            loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn,
            steps=int(m.steps), lr=float(m.lr), seed=seed,
            warmup=int(m.warmup),
            info={"kind": kind, "budget_width": budget, "width": width,
                  "heads": h, "groups": g,
                  "head_size": width // h if hd is None else hd,
                  "params": params}))
  return cells


# ----------------------------------------------------------------------------
# (c) Character-level LM on the Python standard library's source.
# ----------------------------------------------------------------------------

def stdlib_corpus(train_bytes: int, val_bytes: int, val_every: int,
                  root: str = "") -> Dict[str, Any]:
  """Deterministic byte-level corpus from the stdlib's top-level .py files.

  Files `root`/*.py (default: `sysconfig.get_paths()["stdlib"]`), sorted by
  name; file i goes to validation when i % val_every == val_every - 1, else
  to training (a split by file: no text is shared). Each split is the
  concatenation of its files (each followed by a NUL separator byte, which
  stdlib sources do not contain), truncated to train_bytes / val_bytes.
  Returns {"train", "val": uint8 arrays, "files": {"train", "val": names},
  "sha256": {...}, "python": version, "root": root}.
  """
  if val_every < 2:
    raise ValueError(f"`val_every` must be >= 2, got {val_every}.")
  root = root or sysconfig.get_paths()["stdlib"]
  paths = sorted(glob.glob(os.path.join(root, "*.py")))
  if not paths:
    raise ValueError(f"no .py files under {root!r}.")
  split = {"train": [], "val": []}
  for i, path in enumerate(paths):
    split["val" if i % val_every == val_every - 1 else "train"].append(path)
  out = {"files": {}, "sha256": {}, "python": sys.version.split()[0],
         "root": root}
  for name, budget in (("train", train_bytes), ("val", val_bytes)):
    chunks, total, used = [], 0, []
    for path in split[name]:
      if total >= budget:
        break
      with open(path, "rb") as f:
        data = f.read() + b"\0"
      chunks.append(data)
      used.append(os.path.basename(path))
      total += len(data)
    buf = b"".join(chunks)[:budget]
    out[name] = np.frombuffer(buf, np.uint8).copy()
    out["files"][name] = used
    out["sha256"][name] = hashlib.sha256(buf).hexdigest()
  return out


def lm_windows(text, seq_len: int, count: int):
  """The first `count` non-overlapping (seq_len + 1)-byte windows."""
  w = seq_len + 1
  count = min(count, len(text) // w)
  return jnp.asarray(np.asarray(text[:count * w]).reshape(count, w),
                     jnp.int32)


def lm_loss(model, windows):
  logits = model(windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, windows[:, 1:]).mean()


def lm_cells(cfg, corpus) -> List[Cell]:
  lm = cfg.lm
  n = int(lm.seq_len)
  train = jnp.asarray(corpus["train"], jnp.int32)
  val = lm_windows(corpus["val"], n, int(lm.eval_windows))
  kw = dict(seq_len=n, out_dim=256, vocab_size=256,
            num_layers=int(lm.num_layers))
  cells = []
  for kind, budget, width, h, hd, params in family(
      ints(lm.widths), ints(lm.heads), int(lm.fixed_head_size), **kw):
    seed = cfg.seed * 1_000_003 + 37 * h + 11 * budget + (0 if hd is None
                                                          else 3)

    def make_model(width=width, h=h, hd=hd, seed=seed):
      return HeadSizeTransformer(width=width, num_heads=h, head_dim=hd,
                                 causal=True, rngs=nnx.Rngs(seed), **kw)

    def batch_fn(key):
      starts = jax.random.randint(key, (int(lm.batch_size),), 0,
                                  train.shape[0] - n - 1)
      return jax.vmap(lambda s: jax.lax.dynamic_slice(train, (s,),
                                                      (n + 1,)))(starts)

    @nnx.jit
    def eval_fn(model):
      return {"val_bpc": lm_loss(model, val) / jnp.log(2.0)}

    cells.append(Cell(
        name=_cell_name("lm", kind, budget, h), make_model=make_model,
        loss_fn=lm_loss, batch_fn=batch_fn, eval_fn=eval_fn,
        steps=int(lm.steps), lr=float(lm.lr), seed=seed,
        warmup=int(lm.warmup),
        info={"kind": kind, "budget_width": budget, "width": width,
              "heads": h, "head_size": width // h if hd is None else hd,
              "params": params}))
  return cells


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------

# The fit cells have no batch; the mixing and LM batches are split over `data`.
make_mesh = sharding.mesh_from_config("mix.batch_size", "lm.batch_size")


def _rows(res, cells):
  return [dict(res[c.name]) for c in cells]


def run_study(cfg, workdir: str) -> Dict[str, Any]:
  t0 = time.time()
  # Multi-host: before any jax computation (no-op on a single host).
  sharding.maybe_initialize_distributed()     # idempotent; no-op on one host
  f, m, lm = cfg.fit, cfg.mix, cfg.lm
  mesh = make_mesh(cfg)
  fcells = fit_cells(cfg)
  mcells = mix_cells(cfg) if ints(m.heads) else []
  corpus = (stdlib_corpus(int(lm.train_bytes), int(lm.val_bytes),
                          int(lm.val_every)) if ints(lm.heads) else None)
  lcells = lm_cells(cfg, corpus) if corpus is not None else []
  res = train_cells(workdir, fcells + mcells + lcells, chunk=int(cfg.chunk),
                    ckpt_every=int(cfg.ckpt_every),
                    stop_after_steps=int(cfg.stop_after_steps),
                    desc="low_rank_bottleneck", mesh=mesh,
                    fsdp_axis=cfg.fsdp_axis or None)
  n = int(f.n)
  hs_list = ints(f.head_sizes)
  fit = {"n": n, "d": int(f.d), "head_sizes": hs_list, "tolerance": EXACT_TOL,
         "rel_error": {}, "max_abs_error": {}, "kl": {}}
  for hs in hs_list:
    row = res[f"fit_dp{hs}"]
    for k in ("rel_error", "max_abs_error", "kl"):
      fit[k][f"d_p={hs}"] = row[k]
  exact = [hs for hs in hs_list if fit["rel_error"][f"d_p={hs}"] < EXACT_TOL]
  fit["exact_threshold"] = min(exact) if exact else None
  below = [fit["rel_error"][f"d_p={hs}"] for hs in hs_list if hs < n]
  above = [fit["rel_error"][f"d_p={hs}"] for hs in hs_list if hs >= n]
  fit["min_error_below_n"] = min(below) if below else None
  fit["max_error_at_or_above_n"] = max(above) if above else None
  out = {"fit": fit}

  if mcells:
    groups = sorted({mix_groups(cfg, h) for h in ints(m.heads)})
    targets = {g: mix_targets(cfg, g) for g in groups}
    out["mix"] = {
        "n": int(m.n), "groups": int(m.groups),
        "fixed_head_size": int(m.fixed_head_size),
        "rank_rtol": float(m.rank_rtol),
        "target_logit_rank_min": min(int(jnp.min(centred_logit_rank(
            jnp.log(p), float(m.rank_rtol)))) for p in targets.values()),
        "target_eff_rank": {str(g): float(jnp.mean(effective_rank(p)))
                            for g, p in targets.items()},
        "rows": _rows(res, mcells)}
  if lcells:
    out["lm"] = {
        "seq_len": int(lm.seq_len), "fixed_head_size": int(lm.fixed_head_size),
        "corpus": {"python": corpus["python"], "root": corpus["root"],
                   "sha256": corpus["sha256"],
                   "bytes": {k: int(len(corpus[k])) for k in ("train", "val")},
                   "files": {k: len(v) for k, v in corpus["files"].items()}},
        "rows": _rows(res, lcells)}
  make_figures(out, workdir)
  out["config"] = cfg.to_dict()
  out["wall_time_s"] = time.time() - t0
  return out


def _family_curves(rows, xkey, ykey):
  """{(kind, budget): (xs, ys)} sorted by x."""
  curves = {}
  for r in rows:
    curves.setdefault((r["kind"], r["budget_width"]), []).append(
        (r[xkey], r[ykey]))
  return {k: tuple(zip(*sorted(v))) for k, v in sorted(curves.items())}


def _plot_family(plt, workdir, name, rows, xkey, ykey, *, xlabel, ylabel,
                 title, logy=False, logx2=False, hline=None, vline=None):
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  for (kind, budget), (xs, ys) in _family_curves(rows, xkey, ykey).items():
    ax.plot(xs, ys, "o-" if kind == "standard" else "s--",
            label=f"{kind}, budget = width-{budget} standard")
  if hline is not None:
    ax.axhline(hline[0], color="gray", ls=":", label=hline[1])
  if vline is not None:
    ax.axvline(vline[0], color="gray", ls=":", label=vline[1])
  if logy:
    ax.set_yscale("log")
  if logx2:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=6)
  common.save_figure(fig, workdir, name)


def make_figures(out, workdir):
  plt = common.setup_matplotlib()
  fit = out["fit"]
  hs = fit["head_sizes"]
  if hs:
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.plot(hs, [max(fit["rel_error"][f"d_p={h}"], 1e-8) for h in hs], "o-",
            label="Adam fit (mean over problems)")
    ax.axvline(fit["n"], color="gray", ls=":", label=f"n = {fit['n']}")
    ax.axvline(fit["n"] - 1, color="gray", ls="--", lw=0.8,
               label="n - 1 (softmax shift)")
    ax.axhline(fit["tolerance"], color="red", ls=":", lw=0.8,
               label=f"tolerance {fit['tolerance']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("head size d_p")
    ax.set_ylabel("||P_hat - P||_F / ||P||_F")
    ax.set_title(f"fitting random stochastic P, n={fit['n']}")
    ax.legend(fontsize=7)
    common.save_figure(fig, workdir, "fit_error")
  if "mix" in out:
    mx = out["mix"]
    rows = mx["rows"]
    _plot_family(plt, workdir, "mix_vs_heads", rows, "heads", "nmse",
                 xlabel="number of heads h", ylabel="normalised test MSE",
                 title=f"full-rank mixing, n={mx['n']}, G = "
                       + (str(mx["groups"]) if mx["groups"] else "h"),
                 logy=True, logx2=True)
    _plot_family(plt, workdir, "mix_vs_params", rows, "params", "nmse",
                 xlabel="parameters", ylabel="normalised test MSE",
                 title="full-rank mixing vs parameters", logy=True)
    _plot_family(plt, workdir, "mix_rank", rows, "heads", "logit_rank_max",
                 xlabel="number of heads h",
                 ylabel="max numerical rank of centred logits",
                 title=f"learned attention rank (rtol {mx['rank_rtol']:g})",
                 logx2=True, hline=(mx["n"] - 1, "n - 1 (target)"))
  if "lm" in out:
    lmo = out["lm"]
    _plot_family(plt, workdir, "lm_vs_params", lmo["rows"], "params",
                 "val_bpc", xlabel="parameters",
                 ylabel="validation bits / char",
                 title=f"stdlib char LM, context {lmo['seq_len']}")
    _plot_family(plt, workdir, "lm_vs_heads", lmo["rows"], "heads",
                 "val_bpc", xlabel="number of heads h",
                 ylabel="validation bits / char",
                 title=f"stdlib char LM, context {lmo['seq_len']}",
                 logx2=True)


def format_tables(res) -> str:
  lines = []
  fit = res["fit"]
  for h in fit["head_sizes"]:
    lines.append(f"fit n={fit['n']} d_p={h:<3d} rel_error="
                 f"{fit['rel_error'][f'd_p={h}']:.2e}")
  if "mix" in res:
    lines.append("mix: kind      budget width heads head params  nmse      "
                 "rank(max) eff_rank match")
    for r in res["mix"]["rows"]:
      lines.append(
          f"mix: {r['kind']:<9s} {r['budget_width']:>6d} {r['width']:>5d} "
          f"{r['heads']:>5d} {r['head_size']:>4d} {r['params']:>6d}  "
          f"{r['nmse']:.2e}  {r['logit_rank_max']:>4.0f}      "
          f"{r['attn_eff_rank']:5.2f}   {r['match_error']:.3f}")
  if "lm" in res:
    lines.append("lm: kind      budget width heads head params  val_bpc")
    for r in res["lm"]["rows"]:
      lines.append(
          f"lm: {r['kind']:<9s} {r['budget_width']:>6d} {r['width']:>5d} "
          f"{r['heads']:>5d} {r['head_size']:>4d} {r['params']:>7d}  "
          f"{r['val_bpc']:.4f}")
  return "\n".join(lines)


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(Stopped,))
  if res is None:
    return
  print(format_tables(res))
  print(f"wrote {path} ({res['wall_time_s']:.0f}s)", flush=True)


if __name__ == "__main__":
  common.define_study_flags("low_rank_bottleneck.py")
  app.run(main)
