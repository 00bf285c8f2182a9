"""Configs for experiments/benefits_of_rank.py (Amsel, Yehudai, Bruna 2024).

Presets (`--config=experiments/configs/benefits_of_rank.py:<preset>`):
  cpu      (default) CPU analog of the authors' protocol: d = 16, N = 16,
           ranks 16/4/1, width multipliers 1/4/16 (query-key parameters per
           layer d^2, d^2.5, d^3), depths 1 and 2, 2 seeds, 1500 steps, MLP
           64; N-sweep N = 4, 16, 64 at 2 layers, width 4. Not an hour: the
           N-sweep's cells alone cost (CPU-seconds per 1500-step cell,
           measured 2026-12-02 at load ~11, 2 layers, width 4) 34 at N = 4
           rank 1, 165 at N = 16 rank 1, 274 at N = 64 rank 16 and 1,418 at
           N = 64 rank 1 (64 heads of size 1: 256 x 64 x 64 x 64 scores per
           layer), so its N = 64 column is over 2 x (274 + 1,418) = 3,384
           CPU-s for 2 seeds (rank 4 not measured); the whole preset is
           several CPU-hours. Not yet run in full
           (docs/results/benefits_of_rank.md has the parts that were).
  fig1     the CPU analog of the authors' Fig. 1 that fits in an hour on 2
           cores: the `cpu` preset's fig1 sweep only (d = 16, N = 16, ranks
           16/4/1, widths 1/4/16, depths 1 and 2, MLP 64, 1500 steps, lr
           1e-2), 1 seed, no N-sweep, the random rank-1 heads curve at
           d = 8, 16 up to 1024 heads. Cost: 18 training cells, 1,855
           CPU-s summed over cells (per-cell compile + 1500 x CPU-s per
           step, measured 2026-12-02 with the fused rank-1 path at load
           average 8-10; evaluation and the closed-form curve add seconds;
           the most expensive cell, depth 2 with 256 rank-1 heads, 345
           CPU-s). Not yet timed end to end on idle cores. The paper sizes
           are one flag away: --config=...:paper.
  paper    the authors' sizes (paper_experiments/fig1, figN): d = 64,
           N = 16, ranks 64/32/16/8, widths 1/8/64, depths 1/3/5, MLP 2048,
           100k steps (1000 epochs x 100 batches), lr 1e-2, 5 seeds; N-sweep
           N = 4/16/64/256 at 2 layers, width 64, lr 5e-3, 200k steps,
           ranks 64/16/8/4/1 (nheads 1/2/4/8/64 in their yaml is 1 2 4 8 64
           heads -> ranks 64 32 16 8 1). Accelerator-sized.
  prenorm  today's earlier study (pre-RMSNorm residual blocks + readout,
           attention only, Adam b2 0.95 cosine, 1 seed, ranks 16/4/1, depths
           1-3, N = 16 and N-sweep 4) kept for comparison.
  tiny     seconds-long smoke test (CI / unit tests).

Run commands (from the repository root):

  python -m experiments.benefits_of_rank --workdir=/tmp/rank_cpu
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_fig1 \\
      --config=experiments/configs/benefits_of_rank.py:fig1
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_paper \\
      --config=experiments/configs/benefits_of_rank.py:paper
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_tiny \\
      --config=experiments/configs/benefits_of_rank.py:tiny
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_prenorm \\
      --config=experiments/configs/benefits_of_rank.py:prenorm
  # data parallel over every device (batch split over the `data` axis)
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_dp \\
      --config.mesh=data:-1

Fields (override any with --config.<field>=...; lists are comma-separated):
  arch             "postnorm" (authors' model) or "prenorm" (earlier variant)
  dim              d, points live on S^{d-1}
  num_points       N of the fig1 sweep
  ranks            per-head query-key ranks r (each divides d) of fig1
  widths           width multipliers m (m * d / r heads) of fig1
  depths           numbers of layers of fig1
  seeds            seeds per setting (min over seeds is reported)
  mlp_dim          MLP hidden width (0: attention only)
  steps, lr        fig1 training steps and peak learning rate
  warmup_frac      linear warm-up fraction of the steps (authors: 1/20)
  b2               Adam beta2 (authors: 0.95; beta1 0.9, weight decay 0)
  batch_size       fresh samples per step (authors: 256)
  fign_num_points  N values of the N-sweep ("" skips it)
  fign_ranks, fign_depth, fign_width, fign_lr, fign_steps  N-sweep settings
  rank1_dims, rank1_heads, rank1_trials, rank1_coupling  random rank-1
                   heads curve (closed form, no training; "" skips it)
  chunk            steps per jitted loop = one "epoch" of the min-over-
                   training metric (authors: 100 batches)
  ckpt_every       checkpoint period in steps (multiple of chunk)
  eval_batch       held-out examples for the final MSE
  construction_beta  inverse temperature of the one-head construction
  seed             base seed; stop_after_steps (tests); mesh, fsdp_axis

Re-running a command with the same --workdir resumes the interrupted cell
from its last checkpoint, skips finished cells, and gives the same final
numbers as an uninterrupted run.
"""

import ml_collections

PRESETS = ("cpu", "fig1", "paper", "prenorm", "tiny")
# One line per field for `--helpfull` (experiments.common.describe_config).
FIELD_DOCS = {
    "preset": "the preset these values came from",
    "seed": "base seed (model init, data, held-out sets)",
    "arch": "'postnorm' (the authors' model) or 'prenorm' (earlier variant)",
    "dim": "d: points live on the unit sphere S^{d-1}",
    "num_points": "N of the fig1 sweep",
    "ranks": "fig1 per-head query-key ranks r (each divides dim)",
    "widths": "fig1 width multipliers m (m * d / r heads per layer)",
    "depths": "fig1 numbers of layers",
    "seeds": "seeds per setting; the min over seeds is reported",
    "mlp_dim": "MLP hidden width (0: attention-only layers)",
    "steps": "fig1 training steps per cell",
    "lr": "fig1 peak learning rate",
    "warmup_frac": "linear warm-up fraction of the steps (authors: 0.05)",
    "b2": "Adam beta2 (authors: 0.95; beta1 0.9, weight decay 0)",
    "batch_size": "fresh samples per step (authors: 256)",
    "fign_num_points": "N values of the N-sweep ('' skips it)",
    "fign_ranks": "N-sweep ranks",
    "fign_depth": "N-sweep number of layers (authors: 2)",
    "fign_width": "N-sweep width multiplier (authors: d)",
    "fign_lr": "N-sweep peak learning rate (authors: 5e-3)",
    "fign_steps": "N-sweep training steps per cell",
    "rank1_dims": "dims of the random rank-1 heads curve ('' skips it)",
    "rank1_heads": "numbers of random rank-1 heads H",
    "rank1_trials": "random draws per (d, H); the median is reported",
    "rank1_coupling": "'uniform_angle' (authors) or 'independent' q, k",
    "chunk": "steps per jitted loop = one epoch of the min-over-training",
    "ckpt_every": "checkpoint period in steps (a multiple of chunk)",
    "stop_after_steps": "> 0: stop after that many steps (simulated kill)",
    "mesh": "device mesh, e.g. data:1 (one device) or data:-1",
    "fsdp_axis": "'' (replicated) or 'data' (shard large parameters)",
    "eval_batch": "held-out examples for the final MSE",
    "construction_beta": "inverse temperature of the one-head construction",
}
CHOICES = {"arch": ("postnorm", "prenorm"),
           "rank1_coupling": ("uniform_angle", "independent")}


def get_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  from experiments.common import new_config
  c = new_config(preset, PRESETS, default="cpu", aliases={"default": "cpu"})
  preset = c.preset
  c.seed = 0
  c.arch = "postnorm"
  c.dim = 16
  c.num_points = 16
  c.ranks = "16,4,1"
  c.widths = "1,4,16"
  c.depths = "1,2"
  c.seeds = 2
  c.mlp_dim = 64
  c.steps = 1500
  c.lr = 1e-2
  c.warmup_frac = 0.05
  c.b2 = 0.95
  c.batch_size = 256
  c.fign_num_points = "4,16,64"
  c.fign_ranks = "16,4,1"
  c.fign_depth = 2
  c.fign_width = 4
  c.fign_lr = 5e-3
  c.fign_steps = 1500
  c.rank1_dims = "8,16,32,64"
  c.rank1_heads = "1,4,16,64,256,1024,4096"
  c.rank1_trials = 5
  c.rank1_coupling = "uniform_angle"
  c.chunk = 100
  c.ckpt_every = 500
  c.stop_after_steps = 0
  c.mesh = "data:1"
  c.fsdp_axis = ""
  c.eval_batch = 2048
  c.construction_beta = 1000.0

  if preset == "paper":
    c.dim = 64
    c.ranks = "64,32,16,8"
    c.widths = "1,8,64"
    c.depths = "1,3,5"
    c.seeds = 5
    c.mlp_dim = 2048
    c.steps = 100_000
    c.fign_num_points = "4,16,64,256"
    c.fign_ranks = "64,32,16,8,1"
    c.fign_width = 64
    c.fign_steps = 200_000
    c.rank1_heads = ",".join(str(2 ** i) for i in range(15))
    c.ckpt_every = 5000
    c.eval_batch = 8192
  elif preset == "fig1":
    c.seeds = 1
    c.fign_num_points = ""
    c.rank1_dims = "8,16"
    c.rank1_heads = "1,4,16,64,256,1024"
    c.rank1_trials = 3
  elif preset == "prenorm":
    c.arch = "prenorm"
    c.widths = "1"
    c.depths = "1,2,3"
    c.seeds = 1
    c.mlp_dim = 0
    c.batch_size = 128
    c.warmup_frac = 0.0
    c.fign_num_points = "4"
    c.fign_ranks = "16,4,1"
    c.fign_depth = 3
    c.fign_width = 1
    c.fign_lr = 1e-2
    c.rank1_dims = ""
  elif preset == "tiny":
    c.dim = 4
    c.num_points = 4
    c.ranks = "4,1"
    c.widths = "1"
    c.depths = "1"
    c.seeds = 1
    c.mlp_dim = 8
    c.steps = 40
    c.batch_size = 16
    c.fign_num_points = "3"
    c.fign_ranks = "4"
    c.fign_depth = 1
    c.fign_width = 2
    c.fign_lr = 1e-2
    c.fign_steps = 40
    c.rank1_dims = "4"
    c.rank1_heads = "1,8"
    c.rank1_trials = 2
    c.chunk = 10
    c.ckpt_every = 20
    c.eval_batch = 64
  return c
