"""Configs for experiments/low_rank_bottleneck.py (Bhojanapalli et al. 2020).

Run commands (from the repository root):

  # default (a few minutes on a 2-core CPU): (a) fit n = 16 attention
  # matrices with head size d_p in 1..24; (b) associative recall, width 64,
  # heads 1, 2, 8, 32, standard (64 / h) vs fixed head size 16
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_default
  # larger sizes, closer to the paper's regime (n = 128-token contexts as in
  # its BERT runs, fixed head size = n; accelerator-sized)
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_paper \
      --config=experiments/configs/low_rank_bottleneck.py:paper
  # seconds-long smoke test (CI / unit tests)
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_tiny \
      --config=experiments/configs/low_rank_bottleneck.py:tiny
  # data parallel over every device (batch split over the `data` axis)
  python -m experiments.low_rank_bottleneck --workdir=/tmp/lrb_dp \
      --config.mesh=data:-1

Any field can be overridden, e.g. `--config.heads=1,8,32 --config.steps=4000`.
Re-running a command with the same --workdir resumes the interrupted cell
from its last checkpoint, skips finished cells, and gives the same final
numbers as an uninterrupted run.
"""

import ml_collections

PRESETS = ("default", "paper", "tiny")

# One line per field for `--helpfull` (experiments.common.describe_config);
# fields not listed here take the comment next to them in get_config.
FIELD_DOCS = {
    "ckpt_every": "checkpoint period in steps (a multiple of chunk)",
    "seed": "base seed (fit problems, recall evaluation set, model inits, "
            "data stream)",
    "fsdp_axis": "'' (parameters replicated) or 'data' (shard parameters "
                 "and Adam moments >= 2**14 elements)",
    "fit.head_sizes": "head sizes d_p (columns of W_q, W_k) fitted, one "
                      "cell per value",
    "fit.steps": "full-batch Adam steps per head size (cosine decay, no "
                 "warm-up)",
    "fit.lr": "peak Adam learning rate of the fits (cosine decay to 0)",
    "recall.num_keys": "key vocabulary size (stored keys are distinct; "
                       ">= num_pairs)",
    "recall.num_values": "value vocabulary size (= number of output classes)",
    "recall.width": "model width (embedding dim); standard head size = "
                    "width / heads",
    "recall.heads": "head counts swept, each trained with standard and "
                    "with fixed head size",
    "recall.num_layers": "transformer layers (MLP hidden width 4 * width)",
    "recall.steps": "Adam training steps per recall cell",
    "recall.batch_size": "fresh recall problems per training step",
    "recall.lr": "peak Adam learning rate (linear warm-up, then cosine "
                 "decay to 0)",
    "recall.warmup": "linear warm-up steps before the cosine decay",
    "recall.eval_batch": "held-out recall problems for the final accuracy "
                         "and loss",
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  preset = preset or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}.")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  c.chunk = 100                # steps per jitted loop / metrics line
  c.ckpt_every = 500           # multiple of chunk
  c.stop_after_steps = 0       # > 0: simulated kill after that many steps

  # Devices (experiments/sharding.py): "data:1" = one device (default,
  # bit-identical to the single-device run); "data:-1" / "data:4" = data
  # parallel (the batch is split over `data`); fsdp_axis="data" also shards
  # the large (>= 2**14 elements) parameters and Adam moments over it.
  c.mesh = "data:1"
  c.fsdp_axis = ""

  # (a) Representation: fit softmax(X W_q W_k^T X^T) to given stochastic P.
  c.fit = ml_collections.ConfigDict()
  c.fit.n = 16                 # sequence length
  c.fit.d = 32                 # input embedding dim (>= n so X has rank n)
  c.fit.head_sizes = "1,2,4,8,12,14,15,16,20,24"
  c.fit.trials = 8             # independent (X, P) pairs per head size
  c.fit.logit_scale = 2.0      # P rows = softmax(scale * N(0, 1) logits)
  c.fit.steps = 10000
  c.fit.lr = 3e-2

  # (b) Scaling: single-layer associative recall at fixed width.
  c.recall = ml_collections.ConfigDict()
  c.recall.num_pairs = 16      # context: 16 (key, value) tokens + 1 query
  c.recall.num_keys = 64
  c.recall.num_values = 64
  c.recall.width = 64
  c.recall.heads = "1,2,8,32"
  c.recall.fixed_head_size = 16   # the paper's remedy: head size ~ n
  c.recall.num_layers = 1
  c.recall.steps = 400
  c.recall.batch_size = 128
  c.recall.lr = 3e-3
  c.recall.warmup = 40
  c.recall.eval_batch = 4096

  if preset == "paper":
    c.ckpt_every = 2000
    c.chunk = 500
    c.fit.n = 64
    c.fit.d = 128
    c.fit.head_sizes = "1,4,16,32,48,56,62,63,64,80"
    c.fit.steps = 20000
    c.recall.num_pairs = 127     # 128-token sequences, as in the BERT runs
    c.recall.num_keys = 512
    c.recall.num_values = 512
    c.recall.width = 256
    c.recall.heads = "1,2,4,8,16,32,64"
    c.recall.fixed_head_size = 128
    c.recall.num_layers = 2
    c.recall.steps = 50000
    c.recall.batch_size = 256
    c.recall.lr = 1e-3
    c.recall.warmup = 400
  elif preset == "tiny":
    c.chunk = 10
    c.ckpt_every = 20
    c.fit.n = 4
    c.fit.d = 6
    c.fit.head_sizes = "1,4"
    c.fit.trials = 2
    c.fit.steps = 40
    c.recall.num_pairs = 4
    c.recall.num_keys = 8
    c.recall.num_values = 8
    c.recall.width = 8
    c.recall.heads = "1,4"
    c.recall.fixed_head_size = 4
    c.recall.steps = 20
    c.recall.batch_size = 16
    c.recall.eval_batch = 64
    c.recall.warmup = 5
  return c
