r"""Attention benchmark: time and peak memory of every implementation.

Sections (`--sections`, comma-separated) live in `experiments/bench_sections`:
  softmax   attnjax backends ('xla', 'chunked', 'pallas' off-CPU, 'cudnn' on
            GPU) vs jax.nn.dot_product_attention(implementation='xla') over
            sequence lengths, head dims and batch sizes, fwd and fwd+bwd.
  sequence  linear-cost and sparse sequence mechanisms (attnjax.sequence).
  spatial   image/volume mechanisms vs dense attention (attnjax.spatial).

Times are medians over `--repeats` calls after compilation; memory is XLA's
compiled memory analysis (arguments + outputs + temporaries). Ratios compare
rows measured in the same run.

Run:
  python -m experiments.bench_attention --workdir=runs/bench --sections=softmax
  # the long-sequence memory check (chunked only; xla memory reported, not run):
  python -m experiments.bench_attention --workdir=runs/bench_long \
      --sections=softmax --seq_lens=32768 --impls=chunked,attnjax(xla) \
      --modes=fwd_bwd --repeats=1

Writes DIR/results.json (all rows), DIR/*.png (log-log time vs length).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from experiments import bench_utils, common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_attention", "Output directory.")
flags.DEFINE_string("sections", "softmax", "Comma-separated sections.")
flags.DEFINE_bool("quick", False, "Small sweep (smoke test).")
flags.DEFINE_string("dtype", "float32", "float32 | bfloat16 | float16.")
flags.DEFINE_string("seq_lens", "256,512,1024,2048,4096", "Softmax sweep.")
flags.DEFINE_string("head_dims", "64", "Softmax sweep.")
flags.DEFINE_string("batch_sizes", "1", "Softmax sweep.")
flags.DEFINE_integer("heads", 8, "Query heads (softmax section).")
flags.DEFINE_bool("causal", False, "Causal attention (softmax section).")
flags.DEFINE_string("modes", "fwd,fwd_bwd", "fwd and/or fwd_bwd.")
flags.DEFINE_string("impls", "", "Substrings selecting implementations.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_float("max_run_gib", 8.0,
                   "Report but do not run calls needing more memory than this.")
flags.DEFINE_bool("include_interpret", False,
                  "Also time Pallas in interpret mode on CPU (slow).")


@dataclasses.dataclass
class Context:
  quick: bool
  dtype: Any
  repeats: int
  flags: Any
  log: Callable[[str], None]
  time_fn: Callable = bench_utils.time_fn
  peak_memory_bytes: Callable = bench_utils.peak_memory_bytes
  fwd_bwd: Callable = bench_utils.fwd_bwd


def format_table(rows) -> str:
  if not rows:
    return "(no rows)"
  preferred = ["section", "name", "impl", "mode", "batch", "heads", "head_dim",
               "seq_len", "image_size", "time_ms", "mem_mb", "gflops",
               "gflops_per_s", "ratio_vs_jax_nn", "ratio_vs_softmax",
               "ratio_vs_dense", "note"]
  keys = [k for k in preferred if any(k in r for r in rows)]
  def fmt(v):
    if v is None:
      return "-"
    if isinstance(v, float):
      return f"{v:.3g}"
    return str(v)
  table = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.quick and FLAGS["seq_lens"].using_default_value:
    FLAGS.seq_lens = "128,256"
  ctx = Context(quick=FLAGS.quick, dtype=jnp.dtype(FLAGS.dtype),
                repeats=FLAGS.repeats, flags=FLAGS,
                log=lambda m: logging.info(m))
  plt = common.setup_matplotlib()
  del plt
  all_rows = []
  figures = []
  for name in [s for s in FLAGS.sections.split(",") if s]:
    mod = importlib.import_module(f"experiments.bench_sections.{name}")
    rows = mod.run(ctx)
    all_rows.extend(rows)
    print(f"\n== {name} ({jax.default_backend()}: {jax.devices()[0].device_kind}) ==")
    print(format_table(rows), flush=True)
    if hasattr(mod, "plot"):
      for fig, fname in mod.plot(rows):
        figures.append(common.save_figure(fig, FLAGS.workdir, fname))
  out = common.write_results(FLAGS.workdir, {
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "flags": {k: FLAGS[k].value for k in
                ("sections", "quick", "dtype", "seq_lens", "head_dims",
                 "batch_sizes", "heads", "causal", "modes", "impls", "repeats")},
      "rows": all_rows,
  })
  print(f"\nwrote {out} and {len(figures)} figure(s) to {os.path.abspath(FLAGS.workdir)}")


if __name__ == "__main__":
  app.run(main)
