import os, sys, time, resource
sys.path.insert(0, os.getcwd())
import tests.conftest
import jax, jax.numpy as jnp
from flax import nnx
from attnjax.models import vision as V
def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
names = sys.argv[1:] or V.model_names()
tot = {"A": 0.0, "B": 0.0}
x2 = jax.random.normal(jax.random.key(1), (1, 27, 30, 1))
x16 = jax.random.normal(jax.random.key(2), (1, 16, 16, 1))
for i, name in enumerate(names):
  model = V.create_model(name, "tiny", in_chans=1, seed=0); model.eval()
  res = {}
  order = "AB" if i % 2 == 0 else "BA"
  for v in order:
    m = nnx.clone(model)
    t = cpu()
    if v == "A":
      out = nnx.jit(lambda m, x: (m(x), m.features(x)))(m, x2)
      maps = nnx.jit(V.attention_maps)(m, x16)
    else:
      out = nnx.jit(lambda m, x, y: (m(x), m.features(x), V.attention_maps(m, y)))(m, x2, x16)
    jax.block_until_ready(out)
    res[v] = cpu() - t; tot[v] += res[v]
  print(f"{name:12s} A(separate) {res['A']:6.2f}  B(one jit) {res['B']:6.2f}  order {order} load {os.getloadavg()[0]:.1f}", flush=True)
print("total", tot)
