import time, resource, sys, jax, jax.numpy as jnp, numpy as np
from attnjax.softmax import dot_product_attention as dpa
def cpu(): r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
a=jnp.asarray(np.random.default_rng(1).standard_normal((2048,2048)),jnp.float32)
mm=jax.jit(lambda a,b: a@b); mm(a,a).block_until_ready()
def run(f,args,n):
  out=[]
  for _ in range(n):
    t0=time.perf_counter(); c0=cpu(); f(*args).block_until_ready(); out.append((time.perf_counter()-t0,cpu()-c0))
  a_=np.array(out); return np.median(a_[:,0]), np.median(a_[:,1])
for S in (2048,4096):
  q=jnp.asarray(np.random.default_rng(0).standard_normal((1,S,8,64)),jnp.float32)
  for c in (False,True):
    f=jax.jit(lambda q,k,v,c=c: dpa(q,k,v,is_causal=c,implementation='chunked')); f(q,q,q).block_until_ready()
    fl=4*8*S*S*64*(0.5 if c else 1.0)
    for rnd in range(2):
      mw,mc=run(mm,(a,a),7); aw,ac=run(f,(q,q,q),7)
      mrw=2*2048**3/mw; mrc=2*2048**3/mc
      print(f"S={S} causal={c} round{rnd}: matmul {mrw/1e9:.0f} GF/s wall ({mrc/1e9:.0f}/cpu-s); chunked fwd {aw*1e3:.1f} ms wall {ac*1e3:.1f} cpu; ratio wall {fl/aw/mrw:.2f} cpu {fl/ac/mrc:.2f}", flush=True)
