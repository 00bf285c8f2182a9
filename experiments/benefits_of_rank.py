r"""Benefits of rank in attention layers (Amsel, Yehudai, Bruna 2024).

Paper: N. Amsel, G. Yehudai, J. Bruna, "On the Benefits of Rank in Attention
Layers", arXiv 2407.16153 (2024); code: github.com/NoahAmsel/attention-formers
(`paper_experiments/*/*.yaml`, `train.py`, `encoders.py`, `task.py`,
`analysis.py`, `theory_experiments/optim_weight_linsolve.py`).

Task (`task.NearestPointDataset` with num_queries=-1): N points x_1..x_N
uniform on the unit sphere in R^d; the target for token i is the point
farthest from it, y_i = x_{argmin_j <x_i, x_j>}. Loss: squared L2 error per
output vector averaged over tokens (the authors' `mse_loss * dim`);
predicting 0 scores exactly 1.

Two architectures (`--config.arch`):
  "postnorm"  THE AUTHORS' MODEL (`PostNormRankEncoder`): post-norm encoder
              layers h <- N(h + mean_m Attn_m(h)), h <- N(h + MLP(h)) with
              N(x) = s x / ||x|| (one learned scalar s), a ReLU MLP, `width`
              attention modules of d/r heads of rank r averaged, no readout,
              PyTorch initialisation. Used by the `paper` and `cpu` presets.
  "prenorm"   this library's earlier variant (`RankAttentionNet`):
              pre-RMSNorm residual blocks with H = width * d / r heads of
              rank r, optional MLP, linear readout, Flax initialisation.
              Kept for comparison (`--config.arch=prenorm`); it was the
              `default` preset's model before issue 14.

Protocol (`paper`/`cpu` presets, as the authors' configs): AdamW with
weight decay 0 (= Adam), betas (0.9, 0.95), linear warm-up over the first 5%
of steps from 0 then cosine decay to 0 (the authors' `eta_min = lr // 10`
is integer division, i.e. 0; their schedule steps once per 100-batch epoch,
ours every step), batch 256 of fresh samples, `seeds` seeds per setting;
the reported number is, as in their `analysis.py`, the minimum over
training of the mean training loss of each 100-step "epoch" (= chunk; fresh
samples, so it estimates the test loss), then the minimum over seeds. The
final held-out MSE (median over seeds) is reported next to it.

Sweeps (each a list of training cells; shared cells are trained once):
  fig1   the authors' Fig. 1: MSE vs rank r at N = `num_points`, one curve
         per width multiplier m (query-key parameters per layer
         m d^2: d^2, d^2.5, d^3 for m = 1, sqrt(d), d), one panel per depth.
  figN   their N-sweep figure: MSE vs rank at `fign_depth` layers, width
         `fign_width`, one curve per N in `fign_num_points`.
  rank1  their random-features curve: the closed-form best MSE of H random
         rank-1 heads with fitted output weights (hard attention,
         N -> infinity; `rank_models.rank1_random_heads_mse`) vs H, per d.
         No training; float64 NumPy.
Also the explicit one-head construction W_Q W_K^T = -beta I, W_V W_O = I on
the held-out data (the single full-rank head represents the target).

Measured on this project's 2-core machine while 8 sessions shared it (load
average ~20), `cpu` sizes (d = 16, N = 16, MLP 64, batch 256), 1 layer, 1500
steps per cell: 53 s with 1 head, 70-92 s with 4-16 heads (width 1),
390-665 s with 4-64 heads (width 4); 40-60 s of compilation per cell is
included. docs/results/benefits_of_rank.md has what was run.

Depth (measured, not the authors' setting): at N = 4, width 1 (d^2
query-key parameters), 6000 steps, 2 layers leave low rank far from solved
(min over 2 seeds: rank 4 0.309, rank 1 0.580, full rank 0.033; at 1
layer, 1 seed: 0.531, 0.605, 0.032). The authors' figN solves N = 4 at every rank with 2
layers of width d (d^3) after 200k steps; that setting was not run here.

Run (see experiments/configs/benefits_of_rank.py for all presets):

  python -m experiments.benefits_of_rank --workdir=/tmp/rank_cpu \
      --config=experiments/configs/benefits_of_rank.py:cpu

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run.
"data:-1" (or "data:4", ...) is data parallel: each step's batch, sampled
inside the jitted loop, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; parameters
and Adam state are replicated, or sharded over `--config.fsdp_axis=data`
(only arrays of >= 2**14 elements). config.batch_size must be divisible by
the `data` axis size. Numbers equal the single-device run up to float
summation order. Checkpoints restore into whatever mesh the resuming run
uses. Multi-host: `sharding.maybe_initialize_distributed()` picks up SLURM /
Open MPI / TPU / JAX_COORDINATOR_ADDRESS environments.

Outputs in --workdir:
  results.json keys:
    fig1          {"depth=<L>": {"width=<m>": {"rank=<r>": MSE}}}: min over
                  training, then over seeds (the authors' number)
    fig1_final    same layout: median over seeds of the final held-out MSE
    fign          {"N=<n>": {"rank=<r>": MSE}} (min/min), fign_final
    table         one row per trained cell: N, depth, rank, width, heads,
                  seed, params, qk_params_per_layer, min_train_mse (= mse),
                  final_mse
    full_rank_1layer_mse, low_rank_1layer_mse  {"N=<n>": fig1 MSE at depth
                  1 and the narrowest width, rank d / the lowest rank}
    rank1_random_heads  {"d=<d>": {"H=<h>": median MSE over trials}}
    construction_mse    {"N=<n>": MSE of the one-head construction}
    zero_predictor_mse  1.0
    config, wall_time_s
  fig1_rank_width_depth.png  Fig. 1 analog
  figN_rank_vs_N.png         N-sweep analog (left) next to the authors'
                             figN read off their image (right, AUTHORS_FIGN)
  rank1_random_heads.png     random rank-1 heads curve
  metrics.jsonl   training loss per chunk ("step" global, "cell" names it)
  cells/<cell>.json, checkpoints/<cell>/  (resumable sweep, experiments.sweep)
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

from attnjax.models.rank_models import (PostNormRankEncoder, RankAttentionNet,
                                        rank1_random_heads_mse,
                                        sample_rank1_heads, sphere_batch)
from experiments import common, sharding
from experiments.sweep import Cell, Stopped, count_params, ints, train_cells

ARCHS = ("postnorm", "prenorm")

# The authors' figN (paper_experiments/imgs/figN.png of their repository:
# d = 64, 2 layers, width 64, lr 5e-3, 200k steps, min over training and 5
# seeds), values read off the image by eye (+-0.01 on a linear axis; the
# "0.005" entries are the plotted points at the axis' zero line, i.e.
# < 0.01): {N: {rank: MSE}}. Their nheads 1/2/4/8/64 are ranks 64/32/16/8/1.
# Only drawn next to this run's figN for comparison, never asserted.
AUTHORS_FIGN = {
    4: {1: 0.02, 8: 0.01, 16: 0.005, 32: 0.005, 64: 0.005},
    16: {1: 0.63, 8: 0.41, 16: 0.33, 32: 0.23, 64: 0.01},
    64: {1: 0.81, 8: 0.69, 16: 0.60, 32: 0.43, 64: 0.01},
    256: {1: 1.16, 8: 0.81, 16: 0.72, 32: 0.54, 64: 0.04},
}


def per_vector_mse(pred, target):
  """Mean over tokens of ||pred - target||^2."""
  return jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))


def construction_predict(x, beta: float):
  """The paper's one full-rank head: scores -beta <x_i, x_j>, values x_j."""
  scores = -beta * jnp.einsum("bid,bjd->bij", x, x)
  return jnp.einsum("bij,bjd->bid", jax.nn.softmax(scores, axis=-1), x)


def make_model(cfg, rank: int, depth: int, width: int, seed: int):
  d = int(cfg.dim)
  if cfg.arch == "postnorm":
    return PostNormRankEncoder(d, rank, depth, width=width,
                               mlp_dim=int(cfg.mlp_dim),
                               fused=bool(cfg.get("fused_attention", True)),
                               rngs=nnx.Rngs(seed))
  if cfg.arch == "prenorm":
    return RankAttentionNet(d, rank, depth, num_heads=width * (d // rank),
                            mlp_dim=int(cfg.mlp_dim), rngs=nnx.Rngs(seed))
  raise ValueError(f"config.arch must be one of {ARCHS}, got {cfg.arch!r}.")


def cell_name(n, depth, rank, width, lr, steps, s):
  return f"N{n}_L{depth}_r{rank}_w{width}_lr{lr:g}_T{steps}_s{s}"


def make_cells(cfg) -> List[Cell]:
  """Training cells of the fig1 and figN sweeps (deduplicated by name)."""
  d = int(cfg.dim)
  specs = []
  for L in ints(cfg.depths):
    for m in ints(cfg.widths):
      for r in ints(cfg.ranks):
        specs.append((int(cfg.num_points), L, r, m, float(cfg.lr),
                      int(cfg.steps)))
  for n in ints(cfg.fign_num_points):
    for r in ints(cfg.fign_ranks):
      specs.append((n, int(cfg.fign_depth), r, int(cfg.fign_width),
                    float(cfg.fign_lr), int(cfg.fign_steps)))
  cells, seen = [], set()
  warm = float(cfg.warmup_frac)
  for (n, L, r, m, lr, steps) in specs:
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + n)
    x_eval, y_eval = sphere_batch(eval_key, int(cfg.eval_batch), n, d)
    for s in range(int(cfg.seeds)):
      name = cell_name(n, L, r, m, lr, steps, s)
      if name in seen:
        continue
      seen.add(name)
      seed = (cfg.seed * 1_000_003 + s * 7919 + n * 1009 + L * 101 + r
              + 13 * m)

      def mk(r=r, L=L, m=m, seed=seed):
        return make_model(cfg, r, L, m, seed)

      def loss_fn(model, batch):
        x, y = batch
        return per_vector_mse(model(x), y)

      def batch_fn(key, n=n):
        return sphere_batch(key, int(cfg.batch_size), n, d)

      def eval_fn(model, x_eval=x_eval, y_eval=y_eval):
        return {"final_mse": per_vector_mse(model(x_eval), y_eval)}

      cells.append(Cell(
          name=name, make_model=mk, loss_fn=loss_fn, batch_fn=batch_fn,
          eval_fn=eval_fn, steps=steps, lr=lr, seed=seed, b2=float(cfg.b2),
          warmup=int(round(warm * steps)),
          info={"N": n, "depth": L, "rank": r, "width": m,
                "heads": m * (d // r), "seed": s, "lr": lr, "steps": steps,
                "params": count_params(mk()),
                "qk_params_per_layer": m * d * d}))
  return cells


def min_train_losses(workdir: str) -> Dict[str, float]:
  """{cell: min over chunks of the chunk-mean training loss} (metrics.jsonl)."""
  out: Dict[str, float] = {}
  for rec in common.MetricsWriter(workdir).read():
    c = rec.get("cell")
    if c is not None and "loss" in rec:
      out[c] = min(out.get(c, np.inf), float(rec["loss"]))
  return out


def rank1_curve(cfg) -> Dict[str, Dict[str, float]]:
  out = {}
  for d in ints(cfg.rank1_dims):
    row = {}
    for h in ints(cfg.rank1_heads):
      vals = []
      for t in range(int(cfg.rank1_trials)):
        key = jax.random.fold_in(jax.random.key(cfg.seed + 77), d * 1_000_003
                                 + h * 31 + t)
        q, k = sample_rank1_heads(key, h, d, cfg.rank1_coupling)
        vals.append(rank1_random_heads_mse(q, k))
      row[f"H={h}"] = float(np.median(vals))
    out[f"d={d}"] = row
  return out


make_mesh = sharding.mesh_from_config("batch_size")


def validate(cfg):
  d = int(cfg.dim)
  if cfg.arch not in ARCHS:
    raise ValueError(f"config.arch must be one of {ARCHS}, got {cfg.arch!r}.")
  for field in ("ranks", "fign_ranks"):
    for r in ints(cfg[field]):
      if r < 1 or r > d or d % r:
        raise ValueError(f"every entry of config.{field} must divide "
                         f"dim={d}; got {cfg[field]!r}.")
  for field in ("widths", "depths", "seeds"):
    if any(v < 1 for v in ints(cfg[field])):
      raise ValueError(f"config.{field} must be >= 1; got {cfg[field]!r}.")
  if not 0.0 <= float(cfg.warmup_frac) < 1.0:
    raise ValueError(f"config.warmup_frac must be in [0, 1); got "
                     f"{cfg.warmup_frac}.")


def run_study(cfg, workdir: str) -> Dict[str, Any]:
  t0 = time.time()
  sharding.maybe_initialize_distributed()     # idempotent; no-op on one host
  validate(cfg)
  d = int(cfg.dim)
  mesh = make_mesh(cfg)
  cells = make_cells(cfg)
  res = train_cells(workdir, cells, chunk=int(cfg.chunk),
                    ckpt_every=int(cfg.ckpt_every),
                    stop_after_steps=int(cfg.stop_after_steps),
                    desc="benefits_of_rank", mesh=mesh,
                    fsdp_axis=cfg.fsdp_axis or None)
  mins = min_train_losses(workdir)
  table = []
  for c in cells:
    row = {k: res[c.name][k] for k in
           ("N", "depth", "rank", "width", "heads", "seed", "params",
            "qk_params_per_layer", "final_mse")}
    row["min_train_mse"] = float(mins[c.name])
    row["mse"] = row["min_train_mse"]     # the reported number
    table.append(row)
  by_name = {c.name: row for c, row in zip(cells, table)}

  def agg(n, L, r, m, lr, steps):
    rows = [by_name[cell_name(n, L, r, m, lr, steps, s)]
            for s in range(int(cfg.seeds))]
    return (min(x["min_train_mse"] for x in rows),
            float(np.median([x["final_mse"] for x in rows])))

  out: Dict[str, Any] = {"fig1": {}, "fig1_final": {}, "fign": {},
                         "fign_final": {}}
  n1 = int(cfg.num_points)
  for L in ints(cfg.depths):
    a, b = {}, {}
    for m in ints(cfg.widths):
      vals = {f"rank={r}": agg(n1, L, r, m, float(cfg.lr), int(cfg.steps))
              for r in ints(cfg.ranks)}
      a[f"width={m}"] = {k: v[0] for k, v in vals.items()}
      b[f"width={m}"] = {k: v[1] for k, v in vals.items()}
    out["fig1"][f"depth={L}"], out["fig1_final"][f"depth={L}"] = a, b
  for n in ints(cfg.fign_num_points):
    vals = {f"rank={r}": agg(n, int(cfg.fign_depth), r, int(cfg.fign_width),
                             float(cfg.fign_lr), int(cfg.fign_steps))
            for r in ints(cfg.fign_ranks)}
    out["fign"][f"N={n}"] = {k: v[0] for k, v in vals.items()}
    out["fign_final"][f"N={n}"] = {k: v[1] for k, v in vals.items()}
  out["table"] = table
  # One-layer summary at the narrowest width (full rank vs lowest rank).
  out["full_rank_1layer_mse"], out["low_rank_1layer_mse"] = {}, {}
  ranks, widths = ints(cfg.ranks), ints(cfg.widths)
  if 1 in ints(cfg.depths) and ranks and widths:
    row = out["fig1"]["depth=1"][f"width={min(widths)}"]
    if d in ranks:
      out["full_rank_1layer_mse"][f"N={n1}"] = row[f"rank={d}"]
    out["low_rank_1layer_mse"][f"N={n1}"] = row[f"rank={min(ranks)}"]
  out["zero_predictor_mse"] = 1.0
  out["construction_mse"] = {}
  for n in sorted({n1, *ints(cfg.fign_num_points)}):
    key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + n)
    x, y = sphere_batch(key, int(cfg.eval_batch), n, d)
    out["construction_mse"][f"N={n}"] = float(per_vector_mse(
        construction_predict(x, float(cfg.construction_beta)), y))
  out["rank1_random_heads"] = rank1_curve(cfg)
  make_figures(out, cfg, workdir)
  out["config"] = cfg.to_dict()
  out["wall_time_s"] = time.time() - t0
  return out


def make_figures(out, cfg, workdir):
  plt = common.setup_matplotlib()
  d = int(cfg.dim)
  ranks, depths, widths = ints(cfg.ranks), ints(cfg.depths), ints(cfg.widths)
  if ranks and depths and widths:
    draw_fig1(out, cfg, workdir)
  ns, franks = ints(cfg.fign_num_points), ints(cfg.fign_ranks)
  if ns and franks:
    # Left: this run, MSE vs r / d. Right: the authors' figN (d = 64), read
    # off their image (AUTHORS_FIGN), on the same axes.
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.6), sharey=True)
    color = {n: f"C{i}" for i, n in enumerate(sorted({*ns, *AUTHORS_FIGN}))}
    ax = axes[0]
    for n in ns:
      ax.plot([r / d for r in franks],
              [out["fign"][f"N={n}"][f"rank={r}"] for r in franks],
              "o-", color=color[n], label=f"N={n}")
    ax.set_title(f"this run: {cfg.fign_depth} layers, width "
                 f"{cfg.fign_width}, d={d}, {cfg.fign_steps} steps",
                 fontsize=9)
    ax = axes[1]
    for n, row in AUTHORS_FIGN.items():
      rs = sorted(row)
      ax.plot([r / 64 for r in rs], [row[r] for r in rs], "s--",
              color=color[n], label=f"N={n}")
    ax.set_title("authors' figN: 2 layers, width 64, d=64, 200k steps "
                 "(read off)", fontsize=9)
    for ax in axes:
      ax.axhline(1.0, color="gray", ls=":", lw=1, label="predict 0")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("rank per head / d")
      ax.legend(fontsize=7)
    axes[0].set_ylabel("MSE (min over training, seeds)")
    common.save_figure(fig, workdir, "figN_rank_vs_N")
  curve = out["rank1_random_heads"]
  if curve:
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    for dk, row in curve.items():
      hs = [int(k.split("=")[1]) for k in row]
      ax.plot(hs, list(row.values()), "o-", label=dk.replace("=", " = "))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("number of random rank-1 heads H")
    ax.set_ylabel("best MSE (closed form, N -> inf)")
    ax.set_title(f"random rank-1 heads ({cfg.rank1_coupling})")
    ax.legend(fontsize=7)
    common.save_figure(fig, workdir, "rank1_random_heads")


def collect_fig1(workdirs, cfg) -> Dict[str, Any]:
  """fig1 numbers from the finished cells of one or more workdirs.

  For runs split over several workdirs or not finished: reads each
  workdir's cells/<cell>.json and metrics.jsonl and returns
  {"fig1": {"depth=L": {"width=m": {"rank=r": min over training and the
  seeds found}}}, "fig1_final": (median held-out MSE), "seeds": (seeds
  found per entry)}; a cell found in no workdir is left out. The first
  workdir holding a cell wins.
  """
  import json
  import os
  cfg = cfg.copy_and_resolve_references()
  cfg.fign_num_points = ""            # the fig1 cells only
  cells = make_cells(cfg)
  found = {}
  for wd in workdirs:
    mins = min_train_losses(wd)
    for c in cells:
      path = os.path.join(wd, "cells", c.name + ".json")
      if c.name in found or not os.path.exists(path):
        continue
      with open(path) as f:
        res = json.load(f)
      found[c.name] = (c.info, mins[c.name], res["final_mse"])
  out = {"fig1": {}, "fig1_final": {}, "seeds": {}}
  for info, mn, fin in found.values():
    keys = (f"depth={info['depth']}", f"width={info['width']}",
            f"rank={info['rank']}")
    for k, v in (("fig1", mn), ("fig1_final", fin), ("seeds", 1)):
      d = out[k].setdefault(keys[0], {}).setdefault(keys[1], {})
      d.setdefault(keys[2], []).append(v)
  for k, f in (("fig1", min), ("fig1_final", np.median), ("seeds", sum)):
    for a in out[k].values():
      for b in a.values():
        for r in b:
          b[r] = float(f(b[r]))
  return out


def draw_fig1(out, cfg, workdir, name="fig1_rank_width_depth"):
  """Fig. 1 analog (one panel per depth, one curve per width) from
  `out["fig1"]`; entries that are missing are left out of their curve."""
  plt = common.setup_matplotlib()
  d = int(cfg.dim)
  ranks, widths = ints(cfg.ranks), ints(cfg.widths)
  depths = [L for L in ints(cfg.depths) if f"depth={L}" in out["fig1"]]
  fig, axes = plt.subplots(1, len(depths), figsize=(3.8 * len(depths), 3.4),
                           squeeze=False, sharey=True)
  for ax, L in zip(axes[0], depths):
    for m in widths:
      row = out["fig1"][f"depth={L}"].get(f"width={m}", {})
      rs = [r for r in ranks if f"rank={r}" in row]
      if not rs:
        continue
      p = 2 + np.log(m) / np.log(d)
      ax.plot(rs, [row[f"rank={r}"] for r in rs], "o-",
              label=f"width {m} (qk params d^{p:.3g})")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="predict 0")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank r per head")
    ax.set_ylabel("MSE (min over training, seeds)")
    ax.set_title(f"{L} layer{'s' if L > 1 else ''}, d={d}, "
                 f"N={cfg.num_points}")
    ax.legend(fontsize=7)
  common.save_figure(fig, workdir, name)


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(Stopped,))
  if res is None:
    return
  for row in res["table"]:
    print(f"N={row['N']:<4d} L={row['depth']} r={row['rank']:<3d} "
          f"w={row['width']:<3d} seed={row['seed']} "
          f"min_train={row['min_train_mse']:.4f} "
          f"final={row['final_mse']:.4f}")
  print(f"wrote {path} ({res['wall_time_s']:.0f}s)", flush=True)


if __name__ == "__main__":
  common.define_study_flags("benefits_of_rank.py", preset="cpu")
  app.run(main)
