import functools, sys
import jax, jax.numpy as jnp
from experiments import bench_utils as bu
from attnjax.sequence import linear_attention
phi = lambda x: jax.nn.elu(x) + 1.0
def plain(q, k, v):
  fq = phi(q.astype(jnp.float32)); fk = phi(k.astype(jnp.float32))
  v1 = jnp.concatenate([v.astype(jnp.float32), jnp.ones(v.shape[:-1] + (1,), jnp.float32)], -1)
  kv = jnp.einsum("bskf,bskd->bkfd", fk, v1)
  nd = jnp.einsum("btkf,bkfd->btkd", fq, kv)
  return (nd[..., :-1] / nd[..., -1:]).astype(q.dtype)
for s in [int(x) for x in sys.argv[1].split(",")]:
  ks = jax.random.split(jax.random.key(0), 3)
  args = tuple(jax.random.normal(kk, (1, s, 4, 64)) for kk in ks)
  calls = {"scan_fwd": (linear_attention, args), "scan_fb": (bu.fwd_bwd(linear_attention), args),
           "plain_fwd": (plain, args), "plain_fb": (bu.fwd_bwd(plain), args)}
  med, _, cpu = bu.interleaved_times(calls, repeats=5, cpu=True)
  print(s, {k: round(v*1e3, 1) for k, v in med.items()}, "cpu", {k: round(v*1e3, 1) for k, v in cpu.items()},
        "fb/f scan %.2f plain %.2f" % (med["scan_fb"]/med["scan_fwd"], med["plain_fb"]/med["plain_fwd"]), flush=True)
