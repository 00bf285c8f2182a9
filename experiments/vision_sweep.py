"""Sweep experiments/vision_classify.py over models; write an accuracy table.

  python -m experiments.vision_sweep --workdir=/tmp/vision_sweep
  python -m experiments.vision_sweep --workdir=/tmp/vs --models=vit,swin \
      --steps=200 --batch_size=32      # shorter (the README table's setting)

Each model trains its tiny preset in DIR/<model>/ (resumable: finished
models are skipped, interrupted ones resume from their checkpoint). Writes
DIR/results.json ({model: results}) and DIR/accuracy_table.md (markdown:
model, params, test accuracy, images/s, train time) for the README.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from attnjax.models import vision
from experiments import common
from experiments import vision_classify as vc
from experiments.configs import vision_classify as vc_config


def define_flags():
  """Flags (defined only when run as a script; see common.define_study_flags)."""
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_string("models", "", "comma-separated (default: all)")
  flags.DEFINE_integer("steps", 0, "override steps (0: config default)")
  flags.DEFINE_integer("batch_size", 0, "override batch size (0: default)")
  flags.DEFINE_bool("smoke", False, "use the seconds-long smoke config")


def run_sweep(workdir, models, steps=0, smoke=False, batch_size=0):
  rows = {}
  for name in models:
    cfg = vc_config.get_config(name + (",smoke" if smoke else ""))
    if steps:
      cfg.steps = steps
      cfg.eval_every = cfg.ckpt_every = max(steps // 4, 1)
      cfg.warmup_steps = min(cfg.warmup_steps, max(steps // 10, 1))
    if batch_size:
      cfg.batch_size = batch_size
    wd = os.path.join(workdir, name)
    if os.path.exists(os.path.join(wd, "results.json")):
      res = common.read_results(wd)
      if (res.get("steps") == cfg.steps
          and res.get("batch_size") == cfg.batch_size):
        rows[name] = res
        continue
    logging.info("training %s", name)
    rows[name] = vc.train(cfg, wd)
  common.write_results(workdir, rows)
  lines = ["| model | params | test acc. (digits) | images/s (CPU) | train s |",
           "|---|---:|---:|---:|---:|"]
  for name, r in rows.items():
    lines.append(f"| {name} | {r['params']:,} | {100 * r['test_accuracy']:.1f}% "
                 f"| {r['throughput_images_per_s']:.0f} "
                 f"| {r['train_time_s']:.0f} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "accuracy_table.md"), "w") as f:
    f.write(table)
  return rows, table


def main(argv):
  del argv
  f = flags.FLAGS
  models = [m for m in f.models.split(",") if m] or vision.model_names()
  _, table = run_sweep(f.workdir, models, f.steps, f.smoke, f.batch_size)
  print(table)


if __name__ == "__main__":
  define_flags()
  app.run(main)
