import time, resource, jax, jax.numpy as jnp, numpy as np
import attnjax
from attnjax.softmax import dot_product_attention as dpa
S=2048
q=jnp.asarray(np.random.default_rng(0).standard_normal((1,S,8,64)),jnp.float32)
fs={c: jax.jit(lambda q,k,v,c=c: dpa(q,k,v,is_causal=c,implementation='chunked')) for c in (False,True)}
for c,f in fs.items(): f(q,q,q).block_until_ready()
def cpu(): r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
res={False:[],True:[]}
for rep in range(10):
  for c,f in fs.items():
    t0=time.perf_counter(); c0=cpu(); f(q,q,q).block_until_ready(); res[c].append((time.perf_counter()-t0, cpu()-c0))
for c in res:
  a=np.array(res[c]); print('causal' if c else 'noncausal', 'wall ms min/med', 1e3*a[:,0].min(), 1e3*np.median(a[:,0]), 'cpu ms med', 1e3*np.median(a[:,1]), 'cores', np.median(a[:,1]/a[:,0]))
