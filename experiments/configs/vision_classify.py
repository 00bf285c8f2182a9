"""Configs for experiments/vision_classify.py (image classification with the
attnjax.models.vision backbones).

Run commands (from the repository root):

  # default: tiny ViT on scikit-learn's 8x8 digits upsampled to 32x32
  # (offline, a few minutes on a 2-core CPU)
  python -m experiments.vision_classify --workdir=/tmp/vc_vit
  # any model's tiny preset (the config argument is the model name)
  python -m experiments.vision_classify --workdir=/tmp/vc_swin \
      --config=experiments/configs/vision_classify.py:swin
  # CIFAR-10 from a local TFDS directory (never downloads)
  python -m experiments.vision_classify --workdir=/tmp/vc_c10 \
      --config=experiments/configs/vision_classify.py:maxvit \
      --config.dataset=cifar10 --config.tfds_data_dir=~/tensorflow_datasets \
      --config.steps=20000 --config.in_chans=3
  # fine-tune from a timm checkpoint (local file, nothing downloads): the
  # preset must be the checkpoint's architecture, e.g. Swin-T
  python -m experiments.vision_classify --workdir=/tmp/vc_ft \
      --config=experiments/configs/vision_classify.py:swin \
      --config.preset=t --config.image_size=224 --config.in_chans=3 \
      --config.init_from=/path/to/swin_tiny_patch4_window7_224.safetensors
  # seconds-long smoke run (tests)
  python -m experiments.vision_classify --workdir=/tmp/vc_smoke \
      --config=experiments/configs/vision_classify.py:vit,smoke

Devices: `--config.mesh` (default "data:1": one device, today's numbers)
takes a mesh string of experiments/sharding.py, e.g. `--config.mesh=data:-1`
for data parallel over every device (batch_size must be divisible by the
`data` axis size; only `data` is used, a ViT's tokens are not split over a
sequence axis); `--config.fsdp_axis=data` also shards the parameters and
AdamW state. A checkpoint written under one mesh resumes under another.
Example on 4 forced CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
  python -m experiments.vision_classify --workdir=/tmp/vc_d4 \
      --config=experiments/configs/vision_classify.py:vit --config.mesh=data:4

Models: see `attnjax.models.vision.model_names()`. Any field can be
overridden, e.g. `--config.model=nat --config.steps=300`. Re-running the same
command with the same --workdir resumes from the last checkpoint and gives
the same final numbers as an uninterrupted run.
"""

import ml_collections

from attnjax.models.vision import model_names

PRESETS = tuple(model_names())      # the config argument is the model name
PRESET_MODIFIERS = ("smoke",)       # ",smoke": seconds-long run (tests)
# One line per field for `--helpfull` (experiments.common.describe_config);
# fields not listed here take the comment next to them in get_config.
FIELD_DOCS = {
    "steps": "training steps (AdamW updates; the cosine decay ends there)",
    "model": "backbone name (attnjax.models.vision.model_names(); the "
             "config argument sets it)",
    "preset": "size preset of vision.create_model (default 'tiny'; e.g. 't' "
              "for a timm checkpoint's size)",
    "seed": "model init and training batch sampling / augmentation key",
    "init_skip": "comma-separated attnjax sub-trees kept at fresh init when "
                 "loading init_from (default: the head)",
    "tfds_data_dir": "local TFDS directory for a TFDS dataset (required "
                     "then; nothing downloads)",
    "image_size": "input resolution in pixels (square; digits are resized "
                  "bilinearly to it)",
    "in_chans": "input channels of the model (1 for digits, 3 for RGB "
                "datasets)",
    "num_classes": "classifier outputs (10 for digits and cifar10)",
    "test_fraction": "digits only: fraction of each class held out as the "
                     "test set (fixed split)",
    "batch_size": "training images per step (sampled with replacement)",
    "lr": "peak AdamW learning rate (after warm-up)",
    "min_lr_ratio": "final learning rate of the cosine decay, as a fraction "
                    "of lr",
    "warmup_steps": "linear warm-up steps from 0 to lr",
    "weight_decay": "AdamW decoupled weight decay",
    "grad_clip": "global gradient-norm clip before AdamW",
    "label_smoothing": "label smoothing of the cross-entropy targets (0: "
                       "none)",
    "eval_every": "steps between test-accuracy evaluations (metrics lines)",
    "ckpt_every": "steps between orbax checkpoints",
    "eval_batch": "test images per forward pass at evaluation (and for the "
                  "throughput measurement)",
}


def get_config(arg: str = "vit") -> ml_collections.ConfigDict:
  from experiments.common import parse_preset
  model, mods = parse_preset(arg, PRESETS, modifiers=PRESET_MODIFIERS,
                             default="vit")
  smoke = "smoke" in mods
  c = ml_collections.ConfigDict()
  c.model = model
  c.preset = "tiny"
  c.seed = 0
  # Pretrained initialisation: path to a timm .safetensors checkpoint of the
  # same architecture/preset (vision.load_timm); init_skip = comma-separated
  # attnjax sub-trees left at their fresh init (the head, for new classes).
  c.init_from = ""
  c.init_skip = "head"
  # Data: "digits" (sklearn, offline; 1797 8x8 images, 20% held out) or a
  # TFDS name ("cifar10", "imagenet2012") read from tfds_data_dir only.
  c.dataset = "digits"
  c.tfds_data_dir = ""
  c.image_size = 32
  c.in_chans = 1
  c.num_classes = 10
  c.test_fraction = 0.2
  c.augment = True          # random +-2 pixel translations (train only)
  # Optimisation: AdamW, linear warmup + cosine decay (optax).
  c.steps = 500
  c.batch_size = 32
  c.lr = 2e-3
  c.min_lr_ratio = 0.02
  c.warmup_steps = 50
  c.weight_decay = 0.05
  c.grad_clip = 1.0
  c.label_smoothing = 0.0
  c.moh_balance_weight = 0.01     # MoH load-balancing loss weight
  c.eval_every = 100
  c.ckpt_every = 100
  c.eval_batch = 512
  # Devices (experiments/sharding.py mesh string): "data:1" = one device;
  # "data:-1" = data parallel over all devices.
  c.mesh = "data:1"
  c.fsdp_axis = ""            # "data": shard params/AdamW state over `data`
  c.stop_after_steps = 0    # > 0: stop after this many steps in this run
                            # (simulated kill, used by the resume test)
  if smoke:
    c.steps = 20
    c.batch_size = 16
    c.eval_every = 10
    c.ckpt_every = 10
    c.warmup_steps = 2
  return c
