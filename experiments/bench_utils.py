"""Timing and memory measurement shared by the benchmark binaries.

`time_fn` reports the median wall time of a jitted call after compilation
(blocking on the result). `peak_memory_bytes` reads XLA's compiled memory
analysis (arguments + outputs + temporaries - aliased), which is exact for
what XLA allocates and works on every backend, CPU included.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


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
  """Forward + backward of sum(fn(*args)) w.r.t. `argnums` (float32 sum)."""
  def loss(*args):
    return fn(*args).astype("float32").sum()
  return jax.grad(loss, argnums=argnums)
