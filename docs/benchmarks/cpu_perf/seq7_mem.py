"""Compiled memory (XLA memory analysis: args + outputs + temps) of old vs new
(seq7_ab.mechanisms) at S=16384, fwd and fwd+bwd. Run from the repo root:
nice -n 19 .venv/bin/python docs/benchmarks/cpu_perf/seq7_mem.py"""
import sys, functools, jax, jax.numpy as jnp
sys.path.insert(0,'.'); sys.path.insert(0,'docs/benchmarks/cpu_perf')
import seq7_ab as ab
from experiments import bench_utils as bu
fns=ab.mechanisms('b837c0e',['efficient','performer','agent','sliding'])
s=16384
q=k=v=jnp.ones((1,s,4,64))
for (m,tag),fn in fns.items():
  print(m,tag,'fwd %.1f MiB'%(bu.peak_memory_bytes(fn,q,k,v)/2**20),'fwd_bwd %.1f MiB'%(bu.peak_memory_bytes(bu.fwd_bwd(fn),q,k,v)/2**20),flush=True)
