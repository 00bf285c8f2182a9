"""Configs for `experiments.recall_benchmark` (Zoology's MQAR).

Run:
  python -m experiments.recall_benchmark --workdir=/tmp/mqar \
      --config=experiments/configs/recall_benchmark.py:default

Presets:
  default  the CPU default (sized for 15 minutes on an idle 2-core
           machine): vocab 64, T = 16 with 2 key-value pairs, widths 32 and
           64, two layers, every mechanism in MECHANISMS (18 cells), 1000
           Adam steps of batch 64 per cell. Its cells are cpu_full's T = 16
           cells (same seeds, same numbers). Measured: 705 CPU-seconds
           (user + system, on the shared machine; per cell in
           docs/results/recall_benchmark.md).
  cpu_full Zoology's grid scaled down to CPU size: the default plus
           (T, pairs) = (32, 4) (D = T/8): 36 cells, about 2.5x the
           default's CPU time.
  cpu_large  the bigger CPU grid: (T, pairs) = (32, 4) and (64, 8),
           widths 32, 64 and 128, 1500 steps (54 cells; about 3-4x the
           default's CPU time).
  paper    Zoology's Figure 2 sizes (HazyResearch/zoology,
           zoology/experiments/paper_configs/iclr24_zoology_figure2/
           configs.py): vocab 8192, (T, pairs) = (64, 4), (128, 8),
           (256, 16), widths 64..512, two layers, batch 256. Zoology trains
           100k fixed examples for 64 epochs at batch 512 (256 at T = 256)
           and reports the best of four learning rates (1e-4..1e-2); here
           20k steps of fresh batches at one lr (sweep --config.lr for
           theirs). Other differences from their Figure 2 models: ours keep
           the GELU MLP after each mixer (theirs: none), several heads of
           head_dim (their attention: one head), random filler tokens and
           uniform query positions (theirs: 0 and power-law gaps). Hours
           on CPU.
  tiny     for tests (seconds): softmax only, vocab 16, T = 16, 2 pairs.
"""

import ml_collections

PRESETS = ("default", "cpu_full", "cpu_large", "paper", "tiny")
MECHANISMS = ("softmax", "linear", "based", "sliding_window", "performer",
              "mswa", "lightning", "power", "routing_transformer")
CHOICES = {"mechanisms": MECHANISMS}
FIELD_DOCS = {
    "vocab": "token vocabulary: keys from [1, vocab/2), values from "
             "[vocab/2, vocab); 0 is never used",
    "seq_lens": "sequence lengths T swept (one cell per T, width, mechanism)",
    "pairs_per_len": "key-value pairs D = T // pairs_per_len (Zoology: D "
                     "grows with T)",
    "widths": "model widths d swept",
    "num_layers": "mixer + MLP blocks (Zoology: 2)",
    "head_dim": "per-head size of every mixer (heads = width // head_dim)",
    "based_head_dim": "Based's head size (Taylor features 1 + h + h^2 per "
                      "head; Zoology's feature_dim is 8)",
    "window": "window of sliding_window and Based's exact window; MSWA's base",
    "num_features": "Performer random features",
    "mechanisms": "sequence mixers compared (one model per mechanism)",
    "steps": "training steps per cell (fresh batches every step)",
    "eval_examples": "held-out examples for the accuracy (fixed seed)",
    "seed": "seed of parameters and data (per-step batches from fold_in)",
    "batch_size": "training examples per step",
    "lr": "peak AdamW learning rate (linear warm-up, then cosine decay)",
    "warmup": "linear warm-up steps",
    "chunk": "training steps per compiled chunk (one log line each)",
    "ckpt_every": "steps between orbax checkpoints (resume point)",
    "stop_after_steps": "stop after this many steps in this run (0: run to "
                        "the end; tests use it to simulate a kill)",
    "mesh": "device mesh, e.g. 'data:4' (batch split over `data`)",
}


def get_config(preset: str = "default") -> ml_collections.ConfigDict:
  from experiments.common import new_config
  c = new_config(preset, PRESETS, default="default")
  preset = c.preset
  c.seed = 0
  c.vocab = 64
  c.seq_lens = (16,)
  c.pairs_per_len = 8
  c.widths = (32, 64)
  c.num_layers = 2
  c.head_dim = 16
  c.based_head_dim = 8
  c.window = 8
  c.num_features = 64
  c.mechanisms = MECHANISMS
  c.steps = 1000
  c.batch_size = 64
  c.lr = 3e-3
  c.warmup = 50
  c.chunk = 50
  c.ckpt_every = 500
  c.eval_examples = 512
  c.stop_after_steps = 0
  c.mesh = "data:1"
  if preset == "cpu_full":
    c.seq_lens = (16, 32)
  elif preset == "cpu_large":
    c.seq_lens = (32, 64)
    c.widths = (32, 64, 128)
    c.steps = 1500
  elif preset == "paper":
    c.vocab = 8192
    c.seq_lens = (64, 128, 256)
    c.pairs_per_len = 16
    c.widths = (64, 128, 256, 512)
    c.window = 16
    c.num_features = 256
    c.steps = 20000
    c.batch_size = 256
    c.lr = 1e-3
    c.warmup = 1000
    c.chunk = 100
    c.ckpt_every = 1000
    c.eval_examples = 3000
  elif preset == "tiny":
    c.vocab = 16
    c.seq_lens = (16,)
    c.pairs_per_len = 8
    c.widths = (32,)
    c.mechanisms = ("softmax",)
    c.steps = 300
    c.batch_size = 32
    c.lr = 3e-3
    c.warmup = 20
    c.chunk = 50
    c.ckpt_every = 100
    c.eval_examples = 256
  return c
