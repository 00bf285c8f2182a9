"""Timing and memory measurement shared by the benchmark binaries.

`time_fn` reports the median wall time of a jitted call after compilation
(blocking on the result). `peak_memory_bytes` reads XLA's compiled memory
analysis (arguments + outputs + temporaries - aliased), which is exact for
what XLA allocates and works on every backend, CPU included.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def _block(x):
  return jax.tree_util.tree_map(
      lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
            min_time: float = 0.0) -> float:
  """Median seconds per call of jax.jit(fn)(*args), compile excluded."""
  jfn = fn if hasattr(fn, "lower") else jax.jit(fn)
  for _ in range(max(warmup, 1)):
    _block(jfn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start) < min_time:
    t0 = time.perf_counter()
    _block(jfn(*args))
    times.append(time.perf_counter() - t0)
    if len(times) >= 100:
      break
  return statistics.median(times)


def compiled_memory(fn: Callable, *args):
  """XLA memory analysis of jax.jit(fn) for these args (or None)."""
  jfn = fn if hasattr(fn, "lower") else jax.jit(fn)
  compiled = jfn.lower(*args).compile()
  try:
    return compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None


def peak_memory_bytes(fn: Callable, *args) -> int:
  """Bytes XLA needs to run jax.jit(fn)(*args): args + outputs + temps."""
  m = compiled_memory(fn, *args)
  if m is None:
    return -1
  total = (m.argument_size_in_bytes + m.output_size_in_bytes +
           m.temp_size_in_bytes - getattr(m, "alias_size_in_bytes", 0))
  return int(total)


def fwd_bwd(fn: Callable, argnums=(0, 1, 2)) -> Callable:
  """Forward + backward w.r.t. `argnums` with output cotangent sin(out).

  The loss is sum(out * stop_gradient(sin(out))) (float32), so the backward
  gets a data-dependent cotangent as in training. With sum(out) the
  cotangent is a constant of ones, and XLA hoists products of it out of the
  backward loops (in 'chunked', dO V^T was computed once per key block
  instead of once per block pair), timing an easier backward than a real one.
  """
  def loss(*args):
    out = fn(*args).astype("float32")
    return jnp.sum(out * jax.lax.stop_gradient(jnp.sin(out)))
  return jax.grad(loss, argnums=argnums)


def interleaved_times(calls, repeats: int = 5, warmup: int = 1,
                      cpu: bool = False):
  """Median seconds per call of several jitted calls timed round-robin.

  `calls` maps name -> (fn, args). Every call is compiled and warmed up
  first; then each repeat runs every call once, in turn, so that a burst of
  load from other processes on a shared machine hits all of them alike and
  ratios between them stay meaningful. Returns (medians {name: seconds},
  samples {name: [seconds]}), plus medians of process CPU seconds (all
  threads; time spent waiting for a core is not counted) when `cpu`.
  """
  jitted = {}
  for name, (fn, args) in calls.items():
    jfn = fn if hasattr(fn, "lower") else jax.jit(fn)
    for _ in range(max(warmup, 1)):
      _block(jfn(*args))
    jitted[name] = (jfn, args)
  samples = {name: [] for name in calls}
  cpu_samples = {name: [] for name in calls}
  for _ in range(max(repeats, 1)):
    for name, (jfn, args) in jitted.items():
      c0, t0 = time.process_time(), time.perf_counter()
      _block(jfn(*args))
      samples[name].append(time.perf_counter() - t0)
      cpu_samples[name].append(time.process_time() - c0)
  med = {n: statistics.median(s) for n, s in samples.items()}
  if cpu:
    return med, samples, {n: statistics.median(s)
                          for n, s in cpu_samples.items()}
  return med, samples


def loglog_slope(xs, ys):
  """Least-squares slope of log(y) against log(x) (the scaling exponent).

  None with fewer than two distinct positive points.
  """
  pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
         if x and y and x > 0 and y > 0]
  if len({p[0] for p in pts}) < 2:
    return None
  mx = sum(p[0] for p in pts) / len(pts)
  my = sum(p[1] for p in pts) / len(pts)
  sxx = sum((p[0] - mx) ** 2 for p in pts)
  sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
  return sxy / sxx


def machine_load():
  """Load averages (1, 5, 15 min) and CPU count: the contention of a run."""
  try:
    la = os.getloadavg()
  except OSError:
    la = (float("nan"),) * 3
  return {"loadavg_1m": la[0], "loadavg_5m": la[1], "loadavg_15m": la[2],
          "cpu_count": os.cpu_count()}
