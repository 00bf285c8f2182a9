import sys, json, functools
import jax, jax.numpy as jnp
from experiments import bench_utils as bu
from attnjax import sequence as sq, spatial as sp
res = {"load": bu.machine_load()}
def inputs(shape, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, shape, jnp.float32) for k in ks)
which = sys.argv[1]
if which == "linear":
  for causal in (False, True):
    fn = functools.partial(sq.linear_attention, is_causal=causal)
    lens = (1024, 4096, 16384, 65536)
    tf, tb = [], []
    for s in lens:
      args = inputs((1, s, 4, 64), s)
      med, _ = bu.interleaved_times({"fwd": (fn, args), "fwd_bwd": (bu.fwd_bwd(fn), args)}, repeats=3)
      tf.append(med["fwd"]); tb.append(med["fwd_bwd"])
      print(causal, s, med, med["fwd_bwd"] / med["fwd"], flush=True)
    res[f"causal={causal}"] = dict(lens=lens, fwd=tf, fwd_bwd=tb, exp_fwd=bu.loglog_slope(lens, tf), exp_fwd_bwd=bu.loglog_slope(lens, tb))
    print(res[f"causal={causal}"], flush=True)
else:
  fn = lambda q, k, v: sp.neighborhood_attention(q, k, v, 7)
  sizes = (28, 56, 112)
  tf, tb = [], []
  for s in sizes:
    args = inputs((1, s, s, 4, 32))
    med, _ = bu.interleaved_times({"fwd": (fn, args), "fwd_bwd": (bu.fwd_bwd(fn), args)}, repeats=5)
    tf.append(med["fwd"]); tb.append(med["fwd_bwd"])
    print(s, med, flush=True)
  px = [s * s for s in sizes]
  res["na"] = dict(pixels=px, fwd=tf, fwd_bwd=tb, exp_fwd=bu.loglog_slope(px, tf), exp_fwd_bwd=bu.loglog_slope(px, tb))
res["load_end"] = bu.machine_load()
print(json.dumps(res))
