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

(b) Scaling. Single-layer associative recall (16 (key, value) tokens and a
query key; predict the value) at fixed width D, built from
`attnjax.models.rank_models.RecallTransformer` (attnjax.nn TransformerEncoder):
standard multi-head attention (head size D / h) against fixed head size
(`MultiHeadAttention(head_dim=p)`, the paper's remedy) as the number of
heads h grows. Standard degrades once D / h is small (each head's query-key
product has rank D / h); fixed head size does not. The paper shows this on
BERT pre-training (LM1B / SQuAD / MNLI); a CPU-sized synthetic retrieval
task stands in for it here.

Run (see experiments/configs/low_rank_bottleneck.py for all presets):

  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_default

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run.
"data:-1" (or "data:4", ...) is data parallel: each step's batch, sampled
inside the jitted loop, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; parameters
and Adam state are replicated, or sharded over `--config.fsdp_axis=data`
(only arrays of >= 2**14 elements). config.recall.batch_size must be
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
    recall.heads                  the h swept
    recall.standard_accuracy      {"h=<h>": test accuracy, head size D/h}
    recall.fixed_accuracy         {"h=<h>": test accuracy, head size p}
    recall.standard_loss / fixed_loss   test cross-entropy, same keys
    recall.standard_head_size     {"h=<h>": D / h}
    recall.fixed_head_size        p
    recall.params                 {"standard"|"fixed": {"h=<h>": count}}
    recall.chance_accuracy        1 / num_values
    config, wall_time_s           (config includes mesh and fsdp_axis)
  fit_error.png      relative fit error vs head size d_p (log y), n marked
  recall_scaling.png test accuracy vs heads, standard vs fixed head size
  metrics.jsonl, cells/<cell>.json, checkpoints/<cell>/  (written by the
                     resumable `train_cells` driver of experiments/sweep.py,
                     shared with experiments/benefits_of_rank.py)
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import optax
from absl import app
from flax import nnx

from attnjax.models.rank_models import (RecallTransformer,
                                        associative_recall_batch)
from attnjax.softmax import attention_weights
from experiments import common, sharding, sweep
from experiments.sweep import Cell, Stopped, count_params, ints, train_cells


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
# (b) Scaling: associative recall, standard vs fixed head size.
# ----------------------------------------------------------------------------

def recall_cells(cfg) -> List[Cell]:
  r = cfg.recall
  eval_batch = associative_recall_batch(
      jax.random.fold_in(jax.random.key(cfg.seed), 11), int(r.eval_batch),
      int(r.num_pairs), int(r.num_keys), int(r.num_values))
  cells = []
  for kind in ("standard", "fixed"):
    for h in ints(r.heads):
      head_dim = None if kind == "standard" else int(r.fixed_head_size)
      seed = cfg.seed * 1_000_003 + 31 * h + (0 if head_dim is None else 7)

      def make_model(h=h, head_dim=head_dim, seed=seed):
        return RecallTransformer(
            num_keys=int(r.num_keys), num_values=int(r.num_values),
            width=int(r.width), num_heads=h, num_layers=int(r.num_layers),
            head_dim=head_dim, rngs=nnx.Rngs(seed))

      def loss_fn(model, batch):
        keys, values, query, answer = batch
        logits = model(keys, values, query)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, answer).mean()

      def batch_fn(key):
        return associative_recall_batch(key, int(r.batch_size),
                                        int(r.num_pairs), int(r.num_keys),
                                        int(r.num_values))

      def eval_fn(model):
        keys, values, query, answer = eval_batch
        logits = model(keys, values, query)
        return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == answer),
                "loss": optax.softmax_cross_entropy_with_integer_labels(
                    logits, answer).mean()}

      model = make_model()
      cells.append(Cell(
          name=f"recall_{kind}_h{h}", make_model=make_model, loss_fn=loss_fn,
          batch_fn=batch_fn, eval_fn=eval_fn, steps=int(r.steps),
          lr=float(r.lr), seed=seed, warmup=int(r.warmup),
          info={"kind": kind, "heads": h, "head_size": model.head_dim,
                "params": count_params(model)}))
  return cells


# ----------------------------------------------------------------------------
# Driver.
# ----------------------------------------------------------------------------

def make_mesh(cfg):
  """The training mesh from `cfg.mesh`; checks the recall batch size
  against `data` (the fit cells have no batch)."""
  return sweep.make_mesh(cfg.mesh, {
      "config.recall.batch_size": cfg.recall.batch_size})


def run_study(cfg, workdir: str) -> Dict[str, Any]:
  t0 = time.time()
  # Multi-host: before any jax computation (no-op on a single host).
  if not jax.distributed.is_initialized():
    sharding.maybe_initialize_distributed()
  f, r = cfg.fit, cfg.recall
  mesh = make_mesh(cfg)
  fcells, rcells = fit_cells(cfg), recall_cells(cfg)
  res = train_cells(workdir, fcells + rcells, chunk=int(cfg.chunk),
                    ckpt_every=int(cfg.ckpt_every),
                    stop_after_steps=int(cfg.stop_after_steps),
                    desc="low_rank_bottleneck", mesh=mesh,
                    fsdp_axis=cfg.fsdp_axis or None)
  n = int(f.n)
  hs_list = ints(f.head_sizes)
  fit = {"n": n, "d": int(f.d), "head_sizes": hs_list,
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

  heads = ints(r.heads)
  rec = {"heads": heads, "fixed_head_size": int(r.fixed_head_size),
         "width": int(r.width), "chance_accuracy": 1.0 / int(r.num_values),
         "standard_head_size": {f"h={h}": int(r.width) // h for h in heads},
         "params": {"standard": {}, "fixed": {}}}
  for kind in ("standard", "fixed"):
    rec[f"{kind}_accuracy"] = {}
    rec[f"{kind}_loss"] = {}
    for h in heads:
      row = res[f"recall_{kind}_h{h}"]
      rec[f"{kind}_accuracy"][f"h={h}"] = row["accuracy"]
      rec[f"{kind}_loss"][f"h={h}"] = row["loss"]
      rec["params"][kind][f"h={h}"] = row["params"]
  out = {"fit": fit, "recall": rec}
  make_figures(out, workdir)
  out["config"] = cfg.to_dict()
  out["wall_time_s"] = time.time() - t0
  return out


def make_figures(out, workdir):
  plt = common.setup_matplotlib()
  fit = out["fit"]
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  hs = fit["head_sizes"]
  ax.plot(hs, [max(fit["rel_error"][f"d_p={h}"], 1e-8) for h in hs], "o-")
  ax.axvline(fit["n"], color="gray", ls=":", label=f"n = {fit['n']}")
  ax.axvline(fit["n"] - 1, color="gray", ls="--", lw=0.8,
             label="n - 1 (softmax shift)")
  ax.set_yscale("log")
  ax.set_xlabel("head size d_p")
  ax.set_ylabel("||P_hat - P||_F / ||P||_F")
  ax.set_title(f"fitting random stochastic P, n={fit['n']}")
  ax.legend(fontsize=7)
  common.save_figure(fig, workdir, "fit_error")

  rec = out["recall"]
  heads = rec["heads"]
  if not heads:
    return
  fig, ax = plt.subplots(figsize=(4.8, 3.4))
  ax.plot(heads, [rec["standard_accuracy"][f"h={h}"] for h in heads], "o-",
          label=f"standard (head size {rec['width']}/h)")
  ax.plot(heads, [rec["fixed_accuracy"][f"h={h}"] for h in heads], "s-",
          label=f"fixed head size {rec['fixed_head_size']}")
  ax.axhline(rec["chance_accuracy"], color="gray", ls=":", label="chance")
  ax.set_xscale("log", base=2)
  ax.set_xlabel(f"number of heads h (width {rec['width']})")
  ax.set_ylabel("recall test accuracy")
  ax.set_title("associative recall, 1 layer")
  ax.legend(fontsize=7)
  common.save_figure(fig, workdir, "recall_scaling")


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(Stopped,))
  if res is None:
    return
  fit, rec = res["fit"], res["recall"]
  for h in fit["head_sizes"]:
    print(f"fit n={fit['n']} d_p={h:<3d} rel_error="
          f"{fit['rel_error'][f'd_p={h}']:.2e}")
  for h in rec["heads"]:
    print(f"recall h={h:<3d} standard(head {rec['standard_head_size'][f'h={h}']})"
          f" acc={rec['standard_accuracy'][f'h={h}']:.3f}  fixed(head "
          f"{rec['fixed_head_size']}) acc={rec['fixed_accuracy'][f'h={h}']:.3f}")
  print(f"wrote {path} ({res['wall_time_s']:.0f}s)", flush=True)


if __name__ == "__main__":
  common.define_study_flags("low_rank_bottleneck.py")
  app.run(main)
