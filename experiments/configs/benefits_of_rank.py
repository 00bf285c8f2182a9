"""Configs for experiments/benefits_of_rank.py (Amsel, Yehudai, Bruna 2024).

Run commands (from the repository root):

  # default (~5-8 min on a 2-core CPU): d = 16, rank r in {16, 4, 1}
  # (H = d / r heads), depth 1-3, N in {4, 16}
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_default
  # the paper's Figure-1 sizes (d = 64, N = 16, H in {1, 2, 4, 8},
  # 1/3/5 layers, MLP 2048, batch 256, 100k steps): accelerator-sized
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_paper \
      --config=experiments/configs/benefits_of_rank.py:paper
  # seconds-long smoke test (CI / unit tests)
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_tiny \
      --config=experiments/configs/benefits_of_rank.py:tiny
  # data parallel over every device (batch split over the `data` axis)
  python -m experiments.benefits_of_rank --workdir=/tmp/rank_dp \
      --config.mesh=data:-1

Any field can be overridden, e.g. `--config.ranks=16,1 --config.steps=3000`.
Re-running a command with the same --workdir resumes the interrupted cell
from its last checkpoint, skips finished cells, and gives the same final
numbers as an uninterrupted run.
"""

import ml_collections

PRESETS = ("default", "paper", "tiny")


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  preset = preset or "default"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; choose from {PRESETS}.")
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  # Task: N points uniform on S^{d-1}; target of x_i = argmin_j <x_i, x_j>.
  c.dim = 16
  c.num_points = "4,16"        # N values (comma-separated)
  # Models: H = dim / rank heads of rank `rank` (fixed q/k/v/o budget 4 d^2).
  c.ranks = "16,4,1"
  c.depths = "1,2,3"
  c.mlp_dim = 0                # 0: attention-only blocks (the theory's model)
  # Training: fresh samples every step, Adam + cosine decay.
  c.steps = 1500
  c.batch_size = 128
  c.lr = 1e-2
  c.b2 = 0.95                  # Adam beta2 (the authors use betas (0.9, 0.95))
  c.chunk = 100                # steps per jitted loop / metrics line
  c.ckpt_every = 500           # multiple of chunk
  c.stop_after_steps = 0       # > 0: stop once this run trained that many
                               # steps (simulated kill, used by tests)
  # Devices (experiments/sharding.py): "data:1" = one device (default,
  # bit-identical to the single-device run); "data:-1" / "data:4" = data
  # parallel (the batch is split over `data`); fsdp_axis="data" also shards
  # the large (>= 2**14 elements) parameters and Adam moments over it.
  c.mesh = "data:1"
  c.fsdp_axis = ""
  # Evaluation on a fixed held-out batch.
  c.eval_batch = 2048
  # The explicit one-head full-rank construction (QK^T = -beta I, VO = I).
  c.construction_beta = 1000.0

  if preset == "paper":
    # Authors' fig-1 sweep: d=64, N=16, nheads {1,2,4,8} (ranks 64..8),
    # layers {1,3,5}, torch TransformerEncoderLayer with dim_feedforward 2048,
    # Adam lr 1e-2 betas (.9,.95), batch 256, 1000 epochs x 100 batches.
    c.dim = 64
    c.num_points = "16"
    c.ranks = "64,32,16,8"
    c.depths = "1,3,5"
    c.mlp_dim = 2048
    c.steps = 100_000
    c.batch_size = 256
    c.ckpt_every = 5000
    c.chunk = 500
    c.eval_batch = 8192
  elif preset == "tiny":
    c.dim = 4
    c.num_points = "4"
    c.ranks = "4,1"
    c.depths = "1"
    c.steps = 40
    c.batch_size = 16
    c.chunk = 10
    c.ckpt_every = 20
    c.eval_batch = 64
  return c
