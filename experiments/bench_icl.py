r"""Training-step speed of the in-context regression study (issue 13).

Times, side by side in one process (so machine load hits both alike):

  reference   the original step (`icl_regression.make_reference_chunk`):
              one `ICLAttention` module per run, which projects every
              context token through K and V, a value_and_grad and an Adam
              update per run, data from `Task.sample_reference` (5 draws);
  previous    the stacked step as it was before the polynomial sampler:
              all runs' heads stacked on one axis, the reassociated forward
              (`stacked_icl_forward`: scores Z^T (K_h^T Q_h z_q), output
              O_h V_h (Z p); no per-token projection), one Adam update on
              the stacked arrays, data from `Task.sample_previous`
              (Box-Muller through scalar libm cos/sin, batched-dot y);
  fast        the current step (`icl_regression._make_chunk`): the same
              model and update, data from `Task.sample` (polynomial cos/sin,
              samples materialized once, y as d multiply-adds): the same
              numbers as `previous` up to float32 rounding;

both as `lax.scan` chunks of --chunk steps per dispatch, for all runs of the
chosen preset (default: softmax H = 1, 2, 4, 8 and linear H = 2, 17 heads).
Repeats alternate the three and report the median steps/s. Also reported: XLA's
cost analysis of one step (FLOPs, bytes accessed) and the achieved fraction
of this CPU's float32 matmul rate (a jitted 512^3 matmul timed here).

  python -m experiments.bench_icl [--preset=default] [--chunk=200] \
      [--repeats=5] [--out=runs/bench_icl.json]

Prints a table and writes JSON (all numbers, the device and the command).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import icl_regression as icl
from experiments.configs.icl_regression import get_config

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "default", "Config preset whose runs to time.")
flags.DEFINE_integer("chunk", 200, "Steps per dispatch (lax.scan length).")
flags.DEFINE_integer("repeats", 5, "Timed chunks per step function.")
flags.DEFINE_string("out", "runs/bench_icl.json", "JSON output path.")


def _time_chunk(fn, state, n):
  t0 = time.perf_counter()
  out = fn(*state, jnp.asarray(0), n)
  jax.block_until_ready(out)
  return time.perf_counter() - t0


def matmul_rate(size: int = 512, repeats: int = 20) -> float:
  """Measured float32 FLOP/s of a jitted size^3 matmul (best of repeats)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size ** 3 / best


def _cost(fn, *args):
  c = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(c, (list, tuple)):
    c = c[0]
  return float(c.get("flops", float("nan"))), float(
      c.get("bytes accessed", float("nan")))


def bench(preset: str = "default", chunk: int = 200, repeats: int = 5):
  cfg = get_config(preset)
  task = icl.Task(cfg)
  runs = [icl.Run(cfg, task, "softmax", h) for h in icl._ints(cfg.heads)]
  for kind in [k.strip() for k in cfg.linear_variants.split(",") if k]:
    runs += [icl.Run(cfg, task, kind, h) for h in icl._ints(cfg.linear_heads)]
  tx = icl.make_optimizer(cfg)
  stack = icl.Stack(runs)

  ref_p = {r.name: r.params0 for r in runs}
  ref_state = (ref_p, {k: tx.init(v) for k, v in ref_p.items()})
  ref_chunk = icl.make_reference_chunk(cfg, task, runs, tx)
  new_p = stack.stack(ref_p)
  new_state = (new_p, tx.init(new_p))
  new_chunk = icl._make_chunk(cfg, task, stack, tx, None)
  prev_chunk = icl._make_chunk(cfg, task, stack, tx, None,
                               task.sample_previous)
  prev_step = icl.make_step(cfg, task, stack, tx, None, task.sample_previous)

  # One step each, for XLA's cost analysis.
  new_step = icl.make_step(cfg, task, stack, tx)
  ref_flops, ref_bytes = _cost(
      lambda p, o: ref_chunk(p, o, jnp.asarray(0), 1), *ref_state)
  new_flops, new_bytes = _cost(lambda p, o: new_step(p, o, jnp.asarray(0)),
                               *new_state)
  prev_flops, prev_bytes = _cost(
      lambda p, o: prev_step(p, o, jnp.asarray(0)), *new_state)

  # Compile all, then alternate timed chunks.
  _time_chunk(ref_chunk, ref_state, chunk)
  _time_chunk(prev_chunk, new_state, chunk)
  _time_chunk(new_chunk, new_state, chunk)
  times = {"reference": [], "previous": [], "fast": []}
  load = [os.getloadavg()[0]]
  for _ in range(repeats):
    times["reference"].append(_time_chunk(ref_chunk, ref_state, chunk))
    times["previous"].append(_time_chunk(prev_chunk, new_state, chunk))
    times["fast"].append(_time_chunk(new_chunk, new_state, chunk))
    load.append(os.getloadavg()[0])
  rate = matmul_rate()
  rows = {}
  for name, flops, nbytes in (("reference", ref_flops, ref_bytes),
                              ("previous", prev_flops, prev_bytes),
                              ("fast", new_flops, new_bytes)):
    sps = chunk / float(np.median(times[name]))
    rows[name] = {"steps_per_s": sps, "ms_per_step": 1e3 / sps,
                  "flops_per_step": flops, "bytes_per_step": nbytes,
                  "achieved_flops_per_s": flops * sps,
                  "fraction_of_matmul_rate": flops * sps / rate,
                  "chunk_seconds": times[name]}
  return {"preset": preset, "runs": [r.name for r in runs],
          "total_heads": sum(r.H for r in runs), "batch_size": cfg.batch_size,
          "L": cfg.L, "chunk": chunk, "repeats": repeats,
          "matmul_f32_flops_per_s": rate, "rows": rows,
          "speedup": rows["fast"]["steps_per_s"] /
                     rows["reference"]["steps_per_s"],
          "speedup_over_previous": rows["fast"]["steps_per_s"] /
                                   rows["previous"]["steps_per_s"],
          "load_average_1min": load,
          "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
          "machine": platform.processor() or platform.machine(),
          "command": " ".join(sys.argv)}


def main(argv):
  del argv
  res = bench(FLAGS.preset, FLAGS.chunk, FLAGS.repeats)
  print(f"ICL training step, preset={res['preset']} runs={res['runs']} "
        f"({res['total_heads']} heads), batch {res['batch_size']}, "
        f"L={res['L']}, {res['chunk']} steps/dispatch, median of "
        f"{res['repeats']}")
  print(f"{'step':<10} {'steps/s':>9} {'ms/step':>8} {'MFLOP/step':>11} "
        f"{'MB/step':>8} {'GFLOP/s':>8} {'of matmul':>9}")
  for name, r in res["rows"].items():
    print(f"{name:<10} {r['steps_per_s']:9.1f} {r['ms_per_step']:8.3f} "
          f"{r['flops_per_step'] / 1e6:11.2f} {r['bytes_per_step'] / 1e6:8.2f} "
          f"{r['achieved_flops_per_s'] / 1e9:8.3f} "
          f"{100 * r['fraction_of_matmul_rate']:8.2f}%")
  print(f"speedup fast/reference: {res['speedup']:.2f}x, fast/previous: "
        f"{res['speedup_over_previous']:.2f}x; float32 matmul rate here: "
        f"{res['matmul_f32_flops_per_s'] / 1e9:.1f} GFLOP/s; 1-min load "
        f"average during the repeats {min(res['load_average_1min']):.1f}-"
        f"{max(res['load_average_1min']):.1f}")
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      json.dump(res, f, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
