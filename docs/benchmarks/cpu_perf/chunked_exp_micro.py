"""Cost of exp on CPU (issue 22 item 4, fifth session): 64 passes over a
[8, 256, 256] f32 block (a fixed block minus the loop index), each written
out and fed to a P V product, with XLA:CPU's exp, with a polynomial exp in
plain elementwise ops (Cody-Waite, degree 7: chunked_block_exp.diff), and
with an identity-like pass (x * 1.0001); prints the polynomial's largest
relative error on the block and wall / CPU time per call.
Usage: python docs/benchmarks/cpu_perf/chunked_exp_micro.py
"""
import jax, jax.numpy as jnp, numpy as np, time, os
from jax import lax
from experiments import bench_utils
def poly_exp(x):
  # exp(x) = 2^n * exp(r), n = round(x/ln2), r = x - n ln2 (Cody-Waite), degree-7 Taylor/minimax-ish
  x = jnp.clip(x, -87.3, 88.7)
  n = jnp.round(x * 1.4426950408889634)
  r = x - n * 0.693359375
  r = r - n * -2.12194440e-4
  p = 1.0 / 5040.0
  for c in (1/720., 1/120., 1/24., 1/6., 0.5, 1.0, 1.0):
    p = p * r + c
  e = lax.bitcast_convert_type((n.astype(jnp.int32) + 127) << 23, jnp.float32)
  return p * e
base = jax.random.normal(jax.random.key(0), (8,256,256)) * 5 - 5
def mk(fn):
  def f(b):
    def body(j, acc):
      return acc + fn(b - j.astype(jnp.float32) * 1e-3)[:, :, :65].sum()
    return lax.fori_loop(0, 64, body, 0.0)
  return f
def mk2(fn):  # write p out, then consume via a dot (as in the loop)
  v = jnp.ones((8,256,65))
  def f(b):
    def body(j, acc):
      p = fn(b - j.astype(jnp.float32) * 1e-3)
      return acc + jnp.einsum("hqk,hkd->hqd", p, v)
    return lax.fori_loop(0, 64, body, jnp.zeros((8,256,65)))
  return f
x = base
e1 = jnp.exp(x); e2 = jax.jit(poly_exp)(x)
print("max rel err", float(jnp.max(jnp.abs(e2-e1)/e1)))
calls={"xla_exp":(mk2(jnp.exp),(base,)),"poly_exp":(mk2(poly_exp),(base,)),"identity":(mk2(lambda t: t*1.0001),(base,))}
med,_,cpu=bench_utils.interleaved_times(calls,repeats=5,cpu=True)
for n in calls: print(n, f"wall {med[n]*1e3:.1f} cpu {cpu[n]*1e3:.1f}")
print(os.getloadavg())
