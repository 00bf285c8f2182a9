"""Configs for experiments/low_rank_bottleneck.py (Bhojanapalli et al. 2020).

Presets (`--config=experiments/configs/low_rank_bottleneck.py:<preset>`):
  default  CPU-sized (about 15 min on an idle 2-core CPU): (a) fit n = 16
           attention matrices with head size d_p in 1..24 (10k Adam steps);
           (b) full-rank mixing, n = 8, G = h groups, standard width 32
           at heads 1..16 against fixed head size 8 at matched
           parameters, 2000 steps; (c) stdlib character LM, context 16,
           2 layers, standard width 32 at heads 1..16 against fixed head
           size 16 at matched parameters, 1000 steps of batch 32.
  paper    closer to the paper's regime (n = 128 contexts as in its BERT
           runs, fixed head size = n; widths 256/512; accelerator-sized):
           (a) n = 64; (b) n = 64, G = h; (c) context 128, 4 layers,
           20k steps of batch 64 on the whole stdlib.
  tiny     seconds-long smoke test (CI / unit tests).

Run commands (from the repository root):

  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_default
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_paper \
      --config=experiments/configs/low_rank_bottleneck.py:paper
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_tiny \
      --config=experiments/configs/low_rank_bottleneck.py:tiny
  # one part only: an empty sweep list skips a part
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_mix \
      --config.fit.head_sizes= --config.lm.heads=
  # data parallel over every device (batch split over the `data` axis)
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_dp \
      --config.mesh=data:-1

Any field can be overridden, e.g. `--config.mix.heads=4,16
--config.mix.steps=6000`. Re-running a command with the same --workdir
resumes the interrupted cell from its last checkpoint, skips finished
cells, and gives the same final numbers as an uninterrupted run.
"""

import ml_collections

PRESETS = ("default", "paper", "tiny")

# Sweep lists may be empty (the part is skipped).
CONSTRAINTS = {"head_sizes": "ints>0*", "heads": "ints>0*",
               "widths": "ints>0*", "groups": "int>=0", "seq_len": "int>0",
               "rank_examples": "int>0", "eval_windows": "int>0",
               "train_bytes": "int>0", "val_bytes": "int>0",
               "val_every": "int>0", "logit_scale": ">0", "rank_rtol": ">0"}

# One line per field for `--helpfull` (experiments.common.describe_config).
FIELD_DOCS = {
    "preset": "name of the preset these values came from",
    "chunk": "steps per jitted loop / metrics line",
    "ckpt_every": "checkpoint period in steps (a multiple of chunk)",
    "stop_after_steps": "> 0: simulated kill after that many steps (tests)",
    "mesh": "device mesh, 'data:1' (one device) or 'data:-1' (data "
            "parallel over all devices)",
    "seed": "base seed (fit problems, mixing matrices, evaluation sets, "
            "model inits, data streams)",
    "fsdp_axis": "'' (parameters replicated) or 'data' (shard parameters "
                 "and Adam moments >= 2**14 elements)",
    "fit.n": "(a) sequence length n of the fitted attention matrices",
    "fit.d": "(a) input embedding dim (>= n so X has rank n)",
    "fit.head_sizes": "(a) head sizes d_p (columns of W_q, W_k) fitted, "
                      "one cell per value ('' skips part (a))",
    "fit.trials": "(a) independent (X, P) problems per head size",
    "fit.logit_scale": "(a) P rows = softmax(logit_scale * N(0, 1))",
    "fit.steps": "(a) full-batch Adam steps per head size (cosine decay)",
    "fit.lr": "(a) peak Adam learning rate of the fits",
    "mix.n": "(b) sequence length n of the mixing task",
    "mix.groups": "(b) number G of value channels, each mixed by its own "
                  "random stochastic P_g (0: G = heads of the cell)",
    "mix.logit_scale": "(b) P_g rows = softmax(logit_scale * N(0, 1))",
    "mix.widths": "(b) widths D of the standard models = the parameter "
                  "budgets",
    "mix.heads": "(b) head counts h, for both families ('' skips part (b))",
    "mix.fixed_head_size": "(b) head size of the fixed family (paper: n)",
    "mix.num_layers": "(b) transformer layers (rank is measured in layer 0)",
    "mix.steps": "(b) Adam steps per cell",
    "mix.batch_size": "(b) fresh mixing problems per step",
    "mix.lr": "(b) peak Adam learning rate (warm-up, then cosine to 0)",
    "mix.warmup": "(b) linear warm-up steps",
    "mix.eval_batch": "(b) held-out problems for the normalised MSE",
    "mix.rank_examples": "(b) evaluation inputs whose attention ranks are "
                         "measured",
    "mix.rank_rtol": "(b) numerical rank: singular values > rank_rtol * "
                     "the largest",
    "lm.seq_len": "(c) context length n of the character LM",
    "lm.widths": "(c) widths D of the standard models = parameter budgets",
    "lm.heads": "(c) head counts h, both families ('' skips part (c))",
    "lm.fixed_head_size": "(c) head size of the fixed family (paper: n)",
    "lm.num_layers": "(c) transformer layers",
    "lm.steps": "(c) Adam steps per cell",
    "lm.batch_size": "(c) random training windows per step",
    "lm.lr": "(c) peak Adam learning rate (warm-up, then cosine to 0)",
    "lm.warmup": "(c) linear warm-up steps",
    "lm.eval_windows": "(c) non-overlapping validation windows scored",
    "lm.train_bytes": "(c) bytes of stdlib source used for training",
    "lm.val_bytes": "(c) bytes of held-out stdlib source (other files)",
    "lm.val_every": "(c) every val_every-th file (sorted) is held out",
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  from experiments.common import new_config
  c = new_config(preset, PRESETS, default="default")
  preset = c.preset
  c.seed = 0
  c.chunk = 100
  c.ckpt_every = 500
  c.stop_after_steps = 0
  c.mesh = "data:1"
  c.fsdp_axis = ""

  c.fit = ml_collections.ConfigDict()
  c.fit.n = 16
  c.fit.d = 32
  c.fit.head_sizes = "1,2,4,8,12,14,15,16,20,24"
  c.fit.trials = 8
  c.fit.logit_scale = 2.0
  c.fit.steps = 10000
  c.fit.lr = 3e-2

  c.mix = ml_collections.ConfigDict()
  c.mix.n = 8
  c.mix.groups = 0             # 0: G = number of heads of each cell
  c.mix.logit_scale = 2.0
  c.mix.widths = "32"
  c.mix.heads = "1,2,4,8,16"
  c.mix.fixed_head_size = 8
  c.mix.num_layers = 1
  c.mix.steps = 2000
  c.mix.batch_size = 64
  c.mix.lr = 5e-3
  c.mix.warmup = 100
  c.mix.eval_batch = 1024
  c.mix.rank_examples = 64
  c.mix.rank_rtol = 1e-3

  c.lm = ml_collections.ConfigDict()
  c.lm.seq_len = 16
  c.lm.widths = "32"
  c.lm.heads = "1,2,4,8,16"
  c.lm.fixed_head_size = 16
  c.lm.num_layers = 2
  c.lm.steps = 1000
  c.lm.batch_size = 32
  c.lm.lr = 3e-3
  c.lm.warmup = 100
  c.lm.eval_windows = 2048
  c.lm.train_bytes = 2_000_000
  c.lm.val_bytes = 300_000
  c.lm.val_every = 10

  if preset == "paper":
    c.ckpt_every = 2000
    c.chunk = 500
    c.fit.n = 64
    c.fit.d = 128
    c.fit.head_sizes = "1,4,16,32,48,56,62,63,64,80"
    c.fit.steps = 20000
    c.mix.n = 64
    c.mix.widths = "256,512"
    c.mix.heads = "1,2,4,8,16,32,64"
    c.mix.fixed_head_size = 64
    c.mix.steps = 20000
    c.mix.batch_size = 256
    c.lm.seq_len = 128
    c.lm.widths = "256,512"
    c.lm.heads = "1,2,4,8,16,32"
    c.lm.fixed_head_size = 128
    c.lm.num_layers = 4
    c.lm.steps = 20000
    c.lm.batch_size = 64
    c.lm.lr = 1e-3
    c.lm.warmup = 1000
    c.lm.train_bytes = 100_000_000     # the whole stdlib (~4 MB)
    c.lm.val_bytes = 100_000_000
  elif preset == "tiny":
    c.chunk = 10
    c.ckpt_every = 20
    c.fit.n = 4
    c.fit.d = 6
    c.fit.head_sizes = "1,4"
    c.fit.trials = 2
    c.fit.steps = 40
    c.mix.n = 4
    c.mix.widths = "8"
    c.mix.heads = "2,8"
    c.mix.fixed_head_size = 4
    c.mix.steps = 20
    c.mix.batch_size = 16
    c.mix.warmup = 5
    c.mix.eval_batch = 64
    c.mix.rank_examples = 8
    c.lm.seq_len = 8
    c.lm.widths = "8"
    c.lm.heads = "1,4"
    c.lm.fixed_head_size = 8
    c.lm.num_layers = 1
    c.lm.steps = 20
    c.lm.batch_size = 8
    c.lm.warmup = 5
    c.lm.eval_windows = 64
    c.lm.train_bytes = 20_000
    c.lm.val_bytes = 5_000
  return c
