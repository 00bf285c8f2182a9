import os, sys, time, resource
sys.path.insert(0, os.getcwd())
import tests.conftest  # same cache/opt flags as the suite
import jax, jax.numpy as jnp, optax
from flax import nnx
from attnjax.models import vision as V
def cpu(): 
  r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
names = sys.argv[1:] or V.model_names()
print("models", V.model_names(), flush=True)
def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
for name in names:
  t = cpu(); model = V.create_model(name, "tiny", in_chans=1, seed=0); t1 = cpu()
  model2 = V.create_model(name, "tiny", in_chans=1, seed=0); t2 = cpu()
  model.train()
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1)); y = jnp.array([1, 3])
  step = nnx.jit(lambda m, x, y: nnx.value_and_grad(_loss)(m, x, y))
  jax.block_until_ready(step(model, x, y)); t3 = cpu()
  model.eval()
  x2 = jax.random.normal(jax.random.key(1), (1, 27, 30, 1))
  jax.block_until_ready(nnx.jit(lambda m, x: (m(x), m.features(x)))(model, x2)); t4 = cpu()
  maps = nnx.jit(V.attention_maps)(model, jax.random.normal(jax.random.key(2), (1, 16, 16, 1))); jax.block_until_ready(maps); t5 = cpu()
  print(f"{name:14s} create {t1-t:6.2f} create2 {t2-t1:6.2f} step {t3-t2:6.2f} feats {t4-t3:6.2f} maps {t5-t4:6.2f}  load {os.getloadavg()[0]:.1f}", flush=True)
