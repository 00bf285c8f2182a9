r"""Attention benchmark: time, memory, scaling and matmul-rate ratios.

Sections (`--sections`, comma-separated) are the modules of
`experiments/bench_sections` (an unknown name is refused with the list):
  softmax    attnjax backends ('xla', 'chunked', 'pallas' off-CPU, 'cudnn' on
             GPU) vs jax.nn.dot_product_attention(implementation='xla') over
             sequence lengths, non-causal and causal, fwd and fwd+bwd, with
             the f32 matmul rate measured between them.
  crossover  'xla' vs 'chunked' per length: the rule implementation=None
             follows (`--write_crossover` stores it in the package).
  sequence   linear-cost and sparse sequence mechanisms (attnjax.sequence),
             fwd and fwd+bwd, exponent fits of time vs length.
  spatial    image mechanisms vs dense attention (attnjax.spatial), fwd and
             fwd+bwd, exponent fits of time vs pixels.
  four_pattern  CAB's four patterns (noncausal/causal x self/cross) for every
             mechanism in attnjax.sequence.SUPPORT: support, fwd time and
             memory vs softmax attention over lengths.

Every timing is a median over `--repeats` calls after compilation, taken
round-robin with the calls it is compared with (one process), so that load
from other processes hits all alike; memory is XLA's compiled memory analysis
(arguments + outputs + temporaries). Ratios compare rows measured in the same
run; the machine's load average at start and end is printed and stored.

Each section also checks its targets (section `targets(rows)`): the run ends
with one line per target, "ok" or "MISSED", e.g. an exponent above 1.1 for a
mechanism that is linear in theory, or chunked below 0.7 of the matmul rate.

Run:
  python -m experiments.bench_attention --workdir=runs/bench --sections=softmax
  python -m experiments.bench_attention --workdir=runs/bench_seq --sections=sequence
  python -m experiments.bench_attention --workdir=runs/bench_sp --sections=spatial
  python -m experiments.bench_attention --workdir=runs/crossover \
      --sections=crossover --write_crossover
  # the long-sequence memory check (chunked only; xla memory reported, not run):
  python -m experiments.bench_attention --workdir=runs/bench_long \
      --sections=softmax --seq_lens=32768 --impls=chunked,attnjax(xla) \
      --modes=fwd_bwd --repeats=1 --causal=false

Writes DIR/results.json (rows, exponent fits, targets, load), DIR/results.md
(the same as Markdown tables: the committed docs/benchmarks pages quote it;
`--markdown_from=DIR/results.json` rewrites it from an earlier run), DIR/*.png.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import sys
from typing import Any, Callable, List

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from experiments import bench_sections, bench_utils, common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/bench_attention", "Output directory.")
flags.DEFINE_string("sections", "softmax",
                    "Comma-separated sections (see the module docstring).")
flags.DEFINE_bool("quick", False, "Small sweep (smoke test).")
flags.DEFINE_string("dtype", "float32", "float32 | bfloat16 | float16.")
flags.DEFINE_string("seq_lens", "256,512,1024,2048,4096", "Softmax sweep.")
flags.DEFINE_string("head_dims", "64", "Softmax sweep.")
flags.DEFINE_string("batch_sizes", "1", "Softmax sweep.")
flags.DEFINE_integer("heads", 8, "Query heads (softmax section).")
flags.DEFINE_enum("causal", "both", ["false", "true", "both"],
                  "Softmax section: non-causal, causal or both.")
flags.DEFINE_string("modes", "fwd,fwd_bwd", "fwd and/or fwd_bwd.")
flags.DEFINE_string("impls", "", "Substrings selecting implementations.")
flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
flags.DEFINE_float("max_run_gib", 8.0,
                   "Report but do not run calls needing more memory than this.")
flags.DEFINE_bool("include_interpret", False,
                  "Also time Pallas in interpret mode on CPU (slow).")
flags.DEFINE_string("sequence_lens", "",
                    "Sequence section lengths (default 1024..16384; quick "
                    "256,1024).")
flags.DEFINE_string("linear_lens", "",
                    "Lengths for linear_attention in the sequence section "
                    "(default 1024,4096,16384,65536).")
flags.DEFINE_string("spatial_sizes", "",
                    "Spatial section image sides (default 14,28,56,112).")
flags.DEFINE_string("four_pattern_lens", "",
                    "four_pattern section query lengths (default "
                    "1024,2048,4096; quick 128,256; cross: S = T/2).")
flags.DEFINE_string("crossover_lens", "",
                    "Crossover section lengths (default 256..4096).")
flags.DEFINE_string("markdown_from", "",
                    "Only rewrite the Markdown page of an earlier run: "
                    "DIR/results.json -> DIR/results.md (no timing).")
flags.DEFINE_bool("write_crossover", False,
                  "Crossover section: store the measured rule in "
                  "attnjax/softmax/crossover.json for this platform.")


def available_sections() -> List[str]:
  """Names accepted by --sections (the modules of experiments.bench_sections)."""
  return sorted(m.name for m in pkgutil.iter_modules(bench_sections.__path__)
                if not m.name.startswith("_"))


def parse_sections(spec: str) -> List[str]:
  """Validated list of section names; ValueError listing the choices."""
  names = [s.strip() for s in spec.split(",") if s.strip()]
  choices = available_sections()
  unknown = [s for s in names if s not in choices]
  if unknown or not names:
    raise ValueError(
        f"--sections: unknown section(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
        f"choose one or more of {', '.join(choices)} (comma-separated).")
  return names


def _check_sections(spec: str) -> bool:
  try:
    parse_sections(spec)
  except ValueError as e:
    raise flags.ValidationError(str(e)) from None
  return True


flags.register_validator("sections", _check_sections)


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


_COLUMNS = ["section", "name", "impl", "mode", "causal", "batch", "heads",
               "head_dim", "seq_len", "image_size", "time_ms", "cpu_ms", "mem_mb",
               "gflops", "gflops_per_s", "pattern", "kv_len", "supported",
               "mem_ratio_vs_softmax", "ratio_vs_matmul", "ratio_vs_matmul_cpu",
               "ratio_vs_jax_nn",
               "ratio_vs_softmax", "ratio_vs_dense", "ratio_chunked_over_xla",
               "auto", "exponent", "fit_range", "note"]


def _columns(rows):
  return [k for k in _COLUMNS if any(k in r for r in rows)]


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}"
  return str(v)


def format_table(rows) -> str:
  if not rows:
    return "(no rows)"
  keys = _columns(rows)
  fmt = _fmt
  table = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def format_targets(targets) -> str:
  lines = []
  for t in targets:
    status = "ok    " if t["ok"] else "MISSED"
    lines.append(f"  [{status}] {t['target']}: {t['value']}")
  return "\n".join(lines) if lines else "  (no targets)"


def load_note(load) -> str:
  """The end-of-run load line; the caveat about shared cores only when the
  1-minute load average is above the CPU count."""
  la, ncpu = load["loadavg_1m"], load["cpu_count"]
  note = f"load average at end: {la:.1f} (1 min) on {ncpu} CPUs"
  if ncpu and la > ncpu:
    note += (" (above the CPU count, other processes shared the cores: "
             "compare ratios, not absolute times)")
  return note


def markdown_page(results) -> str:
  """results.json (as written by main) -> a Markdown page: the command, the
  machine and its load, then per section its rows and its targets."""
  load = results.get("load", {})
  def la(which):
    d = load.get(which) or {}
    if not d:
      return "?"
    return (f"{d['loadavg_1m']:.1f} (1 min) / {d.get('loadavg_5m', 0):.1f} "
            f"(5 min) on {d['cpu_count']} CPUs")
  out = [f"Command: `{results.get('command', '?')}`", "",
         f"Backend {results.get('backend', '?')} "
         f"({results.get('device', '?')}), jax {results.get('jax_version', '?')}; "
         f"load average at start {la('start')}, at end {la('end')}. "
         "Times are medians of calls timed round-robin in one process; "
         "memory is XLA's compiled memory analysis.", ""]
  rows, targets = results.get("rows", []), results.get("targets", [])
  sections = list(dict.fromkeys(
      [r.get("section", "") for r in rows]
      + [t.get("section", "") for t in targets]))
  for name in sections:
    srows = [r for r in rows if r.get("section", "") == name]
    out.append(f"### {name or 'rows'}")
    out.append("")
    if srows:
      keys = [k for k in _columns(srows) if k != "section"]
      out.append("| " + " | ".join(keys) + " |")
      out.append("|" + "|".join(
          "---:" if any(isinstance(r.get(k), (int, float))
                        and not isinstance(r.get(k), bool) for r in srows)
          else "---" for k in keys) + "|")
      for r in srows:
        out.append("| " + " | ".join(
            _fmt(r.get(k)).replace("|", "\\|") for k in keys) + " |")
      out.append("")
    st = [t for t in targets if t.get("section", "") == name]
    if st:
      n_ok = sum(bool(t["ok"]) for t in st)
      out.append(f"Targets: {n_ok} ok, {len(st) - n_ok} missed.")
      out.append("")
      for t in st:
        out.append(f"- {'ok' if t['ok'] else '**MISSED**'}: {t['target']}: "
                   f"{_fmt(t['value'])}")
      out.append("")
  return "\n".join(out)


def write_markdown(results_path: str) -> str:
  """Writes results.md beside results.json; returns its path."""
  import json
  with open(results_path) as f:
    results = json.load(f)
  path = os.path.join(os.path.dirname(results_path) or ".", "results.md")
  with open(path, "w") as f:
    f.write(markdown_page(results) + "\n")
  return path


def main(argv):
  del argv
  if FLAGS.markdown_from:
    print(f"wrote {write_markdown(FLAGS.markdown_from)}")
    return
  sections = parse_sections(FLAGS.sections)
  if FLAGS.quick and FLAGS["seq_lens"].using_default_value:
    FLAGS.seq_lens = "128,256"
  ctx = Context(quick=FLAGS.quick, dtype=jnp.dtype(FLAGS.dtype),
                repeats=FLAGS.repeats, flags=FLAGS,
                log=lambda m: logging.info(m))
  plt = common.setup_matplotlib()
  del plt
  load_start = bench_utils.machine_load()
  print(f"load average at start: {load_start['loadavg_1m']:.1f} "
        f"(1 min) on {load_start['cpu_count']} CPUs", flush=True)
  all_rows, all_targets = [], []
  figures = []
  for name in sections:
    mod = importlib.import_module(f"experiments.bench_sections.{name}")
    rows = mod.run(ctx)
    all_rows.extend(rows)
    print(f"\n== {name} ({jax.default_backend()}: {jax.devices()[0].device_kind}) ==")
    print(format_table(rows), flush=True)
    if hasattr(mod, "targets"):
      targets = mod.targets(rows)
      all_targets.extend(dict(t, section=name) for t in targets)
      print(f"\n-- {name} targets --\n{format_targets(targets)}", flush=True)
    if hasattr(mod, "plot"):
      for fig, fname in mod.plot(rows):
        figures.append(common.save_figure(fig, FLAGS.workdir, fname))
  load_end = bench_utils.machine_load()
  missed = [t for t in all_targets if not t["ok"]]
  out = common.write_results(FLAGS.workdir, {
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "command": " ".join(["python -m experiments.bench_attention"] +
                          sys.argv[1:]),
      "load": {"start": load_start, "end": load_end},
      "flags": {k: FLAGS[k].value for k in
                ("sections", "quick", "dtype", "seq_lens", "head_dims",
                 "batch_sizes", "heads", "causal", "modes", "impls", "repeats",
                 "sequence_lens", "linear_lens", "spatial_sizes",
                 "crossover_lens", "four_pattern_lens")},
      "rows": all_rows,
      "targets": all_targets,
  })
  md = write_markdown(out)
  print(f"\n{load_note(load_end)}")
  print(f"targets: {len(all_targets) - len(missed)} ok, {len(missed)} missed")
  print(f"wrote {out}, {os.path.basename(md)} and {len(figures)} figure(s) to "
        f"{os.path.abspath(FLAGS.workdir)}")


if __name__ == "__main__":
  app.run(main)
