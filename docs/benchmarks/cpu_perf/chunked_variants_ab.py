"""Variants of the 'chunked' forward tried in the fifth session (issue 22
item 4), timed round-robin in one process (wall and process CPU time), next
to the products-only and products+exp block loops of ceiling_chunked.py.

Modules: saved copies of attnjax/softmax/chunked.py; the three variants are
kept as patches against the module at c567f6f (unchanged since 6b53578);
rebuild them from the repository root:
  mkdir -p runs/ch6
  git show c567f6f:attnjax/softmax/chunked.py > runs/ch6/old_chunked.py
  patch -o runs/ch6/fixed_stabilizer_chunked.py runs/ch6/old_chunked.py \\
      docs/benchmarks/cpu_perf/chunked_fixed_stabilizer.diff
  patch -o runs/ch6/new_exp_chunked.py runs/ch6/old_chunked.py \\
      docs/benchmarks/cpu_perf/chunked_block_exp.diff
  patch -o runs/ch6/quarters_chunked.py runs/ch6/old_chunked.py \\
      docs/benchmarks/cpu_perf/chunked_edge_quarters.diff

Usage:
  chunked_variants_ab.py modules S causal(0|1) repeats
      modules: comma-separated paths; each is timed as 'chunked' (non-
      causal or causal forward, B=1, 8 heads, head_dim 64, f32), plus
      mm_only, mm_exp (jnp.exp) and mm_blockexp (the polynomial exp of
      chunked_block_exp.diff) loops.
"""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

import attnjax
from attnjax.softmax import chunked as chunked_lib
from experiments import bench_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ceiling_chunked  # noqa: E402  (same folder)


def block_exp(x):
  """The polynomial exp of chunked_block_exp.diff (Cody-Waite, degree 7)."""
  xc = jnp.clip(x, -87.33, 88.0)
  n = jnp.round(xc * 1.4426950408889634)
  r = (xc - n * 0.693359375) - n * -2.1219444005469057e-4
  p = jnp.float32(1.0 / 5040.0)
  for c in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 0.5, 1.0, 1.0):
    p = p * r + jnp.float32(c)
  two_n = lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23,
                                   jnp.float32)
  return jnp.where(x < -87.33, jnp.float32(0.0), p * two_n)


def load(path):
  name = os.path.basename(path)[:-3]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  return name, mod


def as_chunked(mod, causal):
  def f(q, k, v):
    cur = chunked_lib.chunked_attention
    chunked_lib.chunked_attention = mod.chunked_attention
    try:
      return attnjax.dot_product_attention(q, k, v, is_causal=causal,
                                           implementation="chunked")
    finally:
      chunked_lib.chunked_attention = cur
  return f


def main():
  paths = sys.argv[1].split(",")
  s, causal, reps = int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
  q, k, v = (jax.random.normal(jax.random.key(i), (1, s, 8, 64))
             for i in range(3))
  calls = {}
  for p in paths:
    name, mod = load(p)
    calls[name] = (as_chunked(mod, causal), (q, k, v))
  calls["mm_only"] = (ceiling_chunked.loop("mm_only", 256, 256), (q, k, v))
  calls["mm_exp"] = (ceiling_chunked.loop("mm_exp", 256, 256), (q, k, v))
  # mm_exp with block_exp: trace once with ceiling_chunked's jnp.exp patched.
  real_exp = ceiling_chunked.jnp.exp
  try:
    ceiling_chunked.jnp.exp = block_exp
    j = jax.jit(ceiling_chunked.loop("mm_exp", 256, 256))
    j(q, k, v)
  finally:
    ceiling_chunked.jnp.exp = real_exp
  calls["mm_blockexp"] = (j, (q, k, v))
  print("load", os.getloadavg(), flush=True)
  med, samples, cpu = bench_utils.interleaved_times(calls, repeats=reps,
                                                    cpu=True)
  for name in calls:
    print(f"{name:28s} wall {med[name] * 1e3:7.1f} ms  cpu "
          f"{cpu[name] * 1e3:7.1f} ms  samples "
          f"{[round(x * 1e3) for x in samples[name]]}", flush=True)
  print("load", os.getloadavg(), flush=True)


if __name__ == "__main__":
  main()
