r"""Benefits of rank in attention layers (Amsel, Yehudai, Bruna 2024).

Paper: N. Amsel, G. Yehudai, J. Bruna, "On the Benefits of Rank in Attention
Layers", arXiv 2407.16153 (2024).

Task (the paper's nearest-neighbour target in its self-attention form, as in
the authors' experiments): N points x_1..x_N uniform on the unit sphere in
R^d; the target for token i is the point farthest from it,
y_i = x_{argmin_j <x_i, x_j>} (the nearest neighbour of -x_i). Loss: squared
L2 error per output vector, averaged over tokens; predicting 0 scores
exactly 1 (targets are unit vectors).

Models (`attnjax.models.rank_models.RankAttentionNet`, built from
`attnjax.nn.TransformerEncoder`): depth-L stacks of pre-RMSNorm residual
attention blocks with H = d / r heads of query-key rank r and a linear
readout. The q/k/v/o parameter budget (4 d^2 + biases per layer) is the same
for every rank. Reproduced: one full-rank head (r = d, H = 1) solves the
task at one layer for every N; heads of low rank fail at one layer (MSE
stays near the trivial level) although they have the same parameter count;
depth narrows the gap for short contexts (small N).

Also reported: the explicit one-head construction W_Q W_K^T = -beta I,
W_V W_O = I (hard-attention limit as beta -> inf), evaluated on the same
data, as an independent check that a single full-rank head represents the
target.

Run (see experiments/configs/benefits_of_rank.py for all presets):

  python -m experiments.benefits_of_rank --workdir=/tmp/rank_default

Devices (`--config.mesh`, helpers in experiments/sharding.py, see
docs/distributed.md): the default "data:1" is the single-device run.
"data:-1" (or "data:4", ...) is data parallel: each step's batch, sampled
inside the jitted loop, is sharded over the `data` axis
(`sharding.constrain_batch`) and XLA all-reduces the gradients; parameters
and Adam state are replicated, or sharded over `--config.fsdp_axis=data`
(only arrays of >= 2**14 elements). config.batch_size must be divisible by
the `data` axis size. Other mesh axes are not used (the work is replicated
over them). Numbers equal the single-device run up to float summation order
(sharded reductions). Checkpoints restore into whatever mesh the resuming
run uses, so a cell started on N devices can be finished on M. Multi-host:
`sharding.maybe_initialize_distributed()` picks up SLURM / Open MPI / TPU /
JAX_COORDINATOR_ADDRESS environments.

Outputs in --workdir:
  results.json keys:
    mse                   {"N=<n>": {"depth=<L>": {"rank=<r>": test MSE}}}
    table                 list of {"N", "depth", "rank", "heads", "mse",
                          "params"} rows (one per sweep cell)
    params                {"depth=<L>": {"rank=<r>": trainable parameters}}
    full_rank_1layer_mse  {"N=<n>": MSE of r = d, H = 1, depth 1}
    low_rank_1layer_mse   {"N=<n>": MSE of the lowest rank, depth 1}
    best_low_rank_mse     {"N=<n>": best MSE over r < d and all depths}
    construction_mse      {"N=<n>": MSE of the explicit one-head
                          construction at beta = construction_beta}
    zero_predictor_mse    1.0 (MSE of predicting 0)
    config, wall_time_s   (config includes mesh and fsdp_axis)
  rank_vs_mse.png     test MSE vs rank, one panel per N, a line per depth
  metrics.jsonl       training loss per chunk of steps ("step" is global
                      across cells; "cell" names the cell)
  cells/<cell>.json   finished cells (skipped on re-runs)
  checkpoints/<cell>/ orbax checkpoints of the cell being trained

Cells are trained by `experiments.sweep.train_cells` (the resumable
sweep-of-training-runs driver shared with experiments/low_rank_bottleneck.py).
"""

from __future__ import annotations

import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
from absl import app
from flax import nnx

from attnjax.models.rank_models import RankAttentionNet, sphere_batch
from experiments import common, sharding, sweep
from experiments.sweep import Cell, Stopped, count_params, ints, train_cells


# ----------------------------------------------------------------------------
# The study.
# ----------------------------------------------------------------------------

def per_vector_mse(pred, target):
  """Mean over tokens of ||pred - target||^2."""
  return jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))


def construction_predict(x, beta: float):
  """The paper's one full-rank head: scores -beta <x_i, x_j>, values x_j."""
  scores = -beta * jnp.einsum("bid,bjd->bij", x, x)
  return jnp.einsum("bij,bjd->bid", jax.nn.softmax(scores, axis=-1), x)


def make_cells(cfg) -> List[Cell]:
  d = int(cfg.dim)
  cells = []
  for n in ints(cfg.num_points):
    eval_key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + n)
    x_eval, y_eval = sphere_batch(eval_key, int(cfg.eval_batch), n, d)
    for depth in ints(cfg.depths):
      for r in ints(cfg.ranks):
        seed = cfg.seed * 1_000_003 + n * 1009 + depth * 101 + r

        def make_model(r=r, depth=depth, seed=seed):
          return RankAttentionNet(d, r, depth, mlp_dim=int(cfg.mlp_dim),
                                  rngs=nnx.Rngs(seed))

        def loss_fn(model, batch):
          x, y = batch
          return per_vector_mse(model(x), y)

        def batch_fn(key, n=n):
          return sphere_batch(key, int(cfg.batch_size), n, d)

        def eval_fn(model, x_eval=x_eval, y_eval=y_eval):
          return {"mse": per_vector_mse(model(x_eval), y_eval)}

        cells.append(Cell(
            name=f"N{n}_L{depth}_r{r}", make_model=make_model,
            loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn,
            steps=int(cfg.steps), lr=float(cfg.lr), seed=seed,
            b2=float(cfg.b2),
            info={"N": n, "depth": depth, "rank": r, "heads": d // r,
                  "params": count_params(make_model())}))
  return cells


def make_mesh(cfg):
  """The training mesh from `cfg.mesh`; checks batch_size against `data`."""
  return sweep.make_mesh(cfg.mesh, {"config.batch_size": cfg.batch_size})


def run_study(cfg, workdir: str) -> Dict[str, Any]:
  t0 = time.time()
  # Multi-host: before any jax computation (no-op on a single host).
  if not jax.distributed.is_initialized():
    sharding.maybe_initialize_distributed()
  d = int(cfg.dim)
  ranks, depths, ns = ints(cfg.ranks), ints(cfg.depths), ints(cfg.num_points)
  for r in ranks:
    if r < 1 or d % r:
      raise ValueError(f"every rank must divide dim={d}; got ranks={ranks}.")
  mesh = make_mesh(cfg)
  cells = make_cells(cfg)
  res = train_cells(workdir, cells, chunk=int(cfg.chunk),
                    ckpt_every=int(cfg.ckpt_every),
                    stop_after_steps=int(cfg.stop_after_steps),
                    desc="benefits_of_rank", mesh=mesh,
                    fsdp_axis=cfg.fsdp_axis or None)
  table = [res[c.name] for c in cells]
  mse = {f"N={n}": {f"depth={L}": {f"rank={r}": res[f"N{n}_L{L}_r{r}"]["mse"]
                                   for r in ranks} for L in depths}
         for n in ns}
  params = {f"depth={L}": {f"rank={r}": res[f"N{ns[0]}_L{L}_r{r}"]["params"]
                           for r in ranks} for L in depths}
  low = [r for r in ranks if r < d]
  out = {
      "mse": mse,
      "table": [{k: row[k] for k in ("N", "depth", "rank", "heads", "mse",
                                     "params")} for row in table],
      "params": params,
      "zero_predictor_mse": 1.0,
      "construction_mse": {},
      "full_rank_1layer_mse": {},
      "low_rank_1layer_mse": {},
      "best_low_rank_mse": {},
  }
  for n in ns:
    key = jax.random.fold_in(jax.random.key(cfg.seed), 10_000 + n)
    x, y = sphere_batch(key, int(cfg.eval_batch), n, d)
    out["construction_mse"][f"N={n}"] = float(per_vector_mse(
        construction_predict(x, float(cfg.construction_beta)), y))
    if d in ranks and 1 in depths:
      out["full_rank_1layer_mse"][f"N={n}"] = mse[f"N={n}"]["depth=1"][
          f"rank={d}"]
    if low and 1 in depths:
      out["low_rank_1layer_mse"][f"N={n}"] = mse[f"N={n}"]["depth=1"][
          f"rank={min(low)}"]
    if low:
      out["best_low_rank_mse"][f"N={n}"] = min(
          mse[f"N={n}"][f"depth={L}"][f"rank={r}"] for L in depths
          for r in low)
  make_figure(out, ranks, depths, ns, d, workdir)
  out["config"] = cfg.to_dict()
  out["wall_time_s"] = time.time() - t0
  return out


def make_figure(out, ranks, depths, ns, d, workdir):
  plt = common.setup_matplotlib()
  fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.4),
                           squeeze=False)
  for ax, n in zip(axes[0], ns):
    for L in depths:
      ys = [out["mse"][f"N={n}"][f"depth={L}"][f"rank={r}"] for r in ranks]
      ax.plot(ranks, ys, "o-", label=f"{L} layer" + ("s" if L > 1 else ""))
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="predict 0")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"rank r per head (H = {d}/r heads)")
    ax.set_ylabel("test MSE (per vector)")
    ax.set_title(f"farthest point, d={d}, N={n}")
    ax.legend(fontsize=7)
  common.save_figure(fig, workdir, "rank_vs_mse")


def main(argv):
  del argv
  res, path = common.run_study_main(run_study, stopped=(Stopped,))
  if res is None:
    return
  for row in res["table"]:
    print(f"N={row['N']:<4d} depth={row['depth']} rank={row['rank']:<3d} "
          f"heads={row['heads']:<3d} mse={row['mse']:.4f}")
  print(f"wrote {path} ({res['wall_time_s']:.0f}s)", flush=True)


if __name__ == "__main__":
  common.define_study_flags("benefits_of_rank.py")
  app.run(main)
