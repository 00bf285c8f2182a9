"""linear_attention: an old copy of the module vs the current one:
fwd and fwd+bwd, interleaved in one process, wall / process CPU.
usage: python docs/benchmarks/cpu_perf/lin_vjp_ab.py S1,S2,.. {noncausal|causal|decay} OLD_LINEAR_PY
(OLD_LINEAR_PY: a copy of attnjax/sequence/linear.py before the change, e.g.
`git show 13479ef:attnjax/sequence/linear.py > /tmp/old_linear.py`)"""
import importlib.util, time, resource, os, sys, types
import jax, jax.numpy as jnp, numpy as np
from attnjax.sequence import linear as new
src = open(sys.argv[3]).read().replace('Op("linear_attention"', 'Op("linear_attention_old_ab"')
old = types.ModuleType("old_linear_ab"); old.__file__ = "old_linear.py"; sys.modules["old_linear_ab"] = old
exec(compile(src, "old_linear.py", "exec"), old.__dict__)
B, N, H = 1, 4, 64
mode = sys.argv[2]
kw = {"noncausal": {}, "causal": {"is_causal": True},
      "decay": {"is_causal": True, "decay": jnp.linspace(0.9, 0.99, N)}}[mode]
def cpu(): r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime
res = {}
for S in [int(x) for x in sys.argv[1].split(",")]:
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v = (jax.random.normal(kk, (B, S, N, H)) for kk in ks[:3])
  ct = jax.random.normal(ks[3], (B, S, N, H))
  fns, mem = {}, {}
  for name, m in (("old", old), ("new", new)):
    f = lambda q, k, v, m=m: m.linear_attention(q, k, v, **kw)
    fns[name + "_fwd"] = jax.jit(f).lower(q, k, v).compile()
    c = jax.jit(lambda q, k, v, f=f: jax.vjp(f, q, k, v)[1](ct)).lower(q, k, v).compile()
    fns[name + "_fb"] = c
    mem[name] = c.memory_analysis().temp_size_in_bytes / 2**20
  g1, g2 = fns["old_fb"](q, k, v), fns["new_fb"](q, k, v)
  err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(g1, g2))
  times = {n: [] for n in fns}
  for rep in range(5):
    for n, f in fns.items():
      c0, w0 = cpu(), time.perf_counter()
      jax.block_until_ready(f(q, k, v))
      times[n].append((time.perf_counter() - w0, cpu() - c0))
  med = {n: (np.median([t[0] for t in ts]) * 1e3, np.median([t[1] for t in ts]) * 1e3) for n, ts in times.items()}
  res[S] = med
  r = lambda a, b, i: med[a][i] / med[b][i]
  print(f"{mode} S={S} grad relerr={err:.1e} load={os.getloadavg()[0]:.1f} fwd+bwd temp MiB old {mem['old']:.0f} new {mem['new']:.0f} | " + " ".join(f"{n}={w:.1f}/{c:.1f}" for n, (w, c) in med.items()) +
        f" ms wall/CPU | fb/fwd old {r('old_fb','old_fwd',0):.2f}/{r('old_fb','old_fwd',1):.2f} new {r('new_fb','new_fwd',0):.2f}/{r('new_fb','new_fwd',1):.2f}"
        f" | new/old fb {r('new_fb','old_fb',0):.2f}/{r('new_fb','old_fb',1):.2f} fwd {r('new_fwd','old_fwd',0):.2f}/{r('new_fwd','old_fwd',1):.2f}", flush=True)
Ss = sorted(res)
if len(Ss) > 1:
  for n in res[Ss[0]]:
    sl = [np.polyfit(np.log(Ss), np.log([res[s][n][i] for s in Ss]), 1)[0] for i in (0, 1)]
    print(f"{mode} exponent {n}: wall {sl[0]:.3f} CPU {sl[1]:.3f}")
