"""Interleaved CPU-s per training step of benefits_of_rank cells, module vs
fused attention (the measurement quoted in docs/results/benefits_of_rank.md).

  python docs/results/benefits_of_rank/step_cost.py 16,1,1,16 16,1,1,4

Each argument N,L,r,m is one fig1 cell of the `cpu` preset (N points,
L layers, rank r, width m). Both formulations are compiled, then 10-step
chunks alternate (module, fused) three times; the minimum process CPU-s per
step of each is printed with their ratio, and the last chunk's loss (equal
up to float rounding).
"""
import resource, sys, time
import jax, jax.numpy as jnp
from experiments import benefits_of_rank as study, sweep
from experiments.configs.benefits_of_rank import get_config

def cpu():
  r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime + r.ru_stime

def built(n, L, r, m, fused, chunk):
  c = get_config('cpu'); c.num_points = n; c.depths = str(L); c.ranks = str(r)
  c.widths = str(m); c.seeds = 1; c.fign_num_points = ''; c.fused_attention = fused
  cell = study.make_cells(c)[0]
  b = sweep.build_cell(cell, chunk=chunk, mesh=sweep.make_mesh('data:1', {}))
  jax.block_until_ready(b.run_chunk(b.init['params'], b.init['opt'], 0, b.rest))
  return b

def run(b, chunk):
  t0 = cpu(); out = b.run_chunk(b.init['params'], b.init['opt'], 0, b.rest); jax.block_until_ready(out)
  return (cpu() - t0) / chunk * 1e3, float(out[-1])

chunk = 10
for spec in sys.argv[1:]:
  n, L, r, m = map(int, spec.split(','))
  bs = {f: built(n, L, r, m, f, chunk) for f in (False, True)}
  ts = {False: [], True: []}
  for rep in range(3):
    for f in (False, True):
      t, loss = run(bs[f], chunk); ts[f].append(t)
  print(f"N={n} L={L} r={r} m={m}: module {min(ts[False]):.1f} fused {min(ts[True]):.1f} CPU-ms/step; ratio {min(ts[False])/min(ts[True]):.2f}; loss {loss:.6f}", flush=True)
