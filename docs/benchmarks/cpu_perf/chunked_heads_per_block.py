"""Heads per block for the 'chunked' backend (issue 22 item 4): the
attention call on all 8 heads at once (hb8: a [8, 256, 256] f32 logits block
is 2 MiB, the size of one core's L2) against lax.map over groups of hb heads
(hb4, hb2, hb1: 1 MiB, 512 KiB, 256 KiB blocks), round-robin with the f32
2048^3 matmul, wall and process CPU time.
Usage: chunked_heads_per_block.py S1,S2 fwd[,fwd_bwd] repeats 8,4,2,1 [0|1]
"""
import os, sys, jax, jax.numpy as jnp
from jax import lax
import attnjax
from experiments import bench_utils
def mk(hb, causal, mode):
  def f(q,k,v):
    def one(args):
      q,k,v=args
      return attnjax.dot_product_attention(q,k,v,is_causal=causal,implementation="chunked")
    if hb==8: return one((q,k,v))
    b,s,n,h=q.shape
    sp=lambda x: x.reshape(b,s,n//hb,hb,h).transpose(2,0,1,3,4)
    o=lax.map(one,(sp(q),sp(k),sp(v)))
    return o.transpose(1,2,0,3,4).reshape(b,s,n,h)
  return bench_utils.fwd_bwd(f) if mode=="fwd_bwd" else f
lens=[int(x) for x in sys.argv[1].split(",")]; modes=sys.argv[2].split(","); reps=int(sys.argv[3]); hbs=[int(x) for x in sys.argv[4].split(",")]
causals=[False,True] if len(sys.argv)<6 else [sys.argv[5]=="1"]
n=2048; a=jax.random.normal(jax.random.key(1),(n,n))
print("load",os.getloadavg(),flush=True)
for s in lens:
  q,k,v=(jax.random.normal(jax.random.key(i),(1,s,8,64)) for i in range(3))
  for mode in modes:
    calls={"matmul":(lambda x:x@x,(a,))}
    for c in causals:
      for hb in hbs: calls[f"hb{hb} c={int(c)}"]=(mk(hb,c,mode),(q,k,v))
    med,_,cpu=bench_utils.interleaved_times(calls,repeats=reps,cpu=True)
    mm,mmc=2*n**3/med["matmul"],2*n**3/cpu["matmul"]
    for nm in calls:
      if nm=="matmul": continue
      c=nm.endswith("c=1"); fl=4*8*s*s*64*(3.5 if mode=="fwd_bwd" else 1)/(2 if c else 1)
      print(f"S={s} {mode} {nm}: {med[nm]*1e3:.0f}ms cpu {cpu[nm]*1e3:.0f}ms r={fl/med[nm]/mm:.2f} rcpu={fl/cpu[nm]/mmc:.2f}",flush=True)
    print("load",os.getloadavg(),flush=True)
