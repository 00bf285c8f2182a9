"""Static report of the Pallas kernels on accelerators we may not have.

For each kernel configuration this lowers the forward and forward+backward
for a TPU (Mosaic) and compiles the GPU (Triton) kernels to cubin with the
`triton` package, recording per kernel: block sizes, warps, stages and
shared memory per block against the device limit. Nothing runs on an
accelerator: this is what can be known about the kernels on a CPU-only
machine (see pallas_kernels/aot.py). Timing still needs the device:
experiments/bench_kernels.py.

Run:  python -m experiments.kernel_aot_report --workdir=runs/kernel_aot
Writes DIR/results.json and DIR/table.md (GPU cells: shared memory per
block in KiB of each kernel, fwd / dQ / dK-dV) and prints a table.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.common import write_results
from pallas_kernels import aot
from pallas_kernels import block_sparse as bsp
from pallas_kernels import flash as fa
from pallas_kernels import linear_attention as la
from pallas_kernels import neighborhood as nb


def _grad(fn):
  return lambda *a: jax.grad(
      lambda *x: fn(*x).astype(jnp.float32).sum(), (0, 1, 2))(*a)


def configs(seq_len: int, head_dims, dtypes):
  """name -> (fn, (q, k, v) ShapeDtypeStructs)."""
  out = {}
  for dt in dtypes:
    dn = jnp.dtype(dt).name
    for h in head_dims:
      q = jax.ShapeDtypeStruct((1, seq_len, 8, h), dt)
      kv = jax.ShapeDtypeStruct((1, seq_len, 2, h), dt)
      out[f"flash h{h} {dn}"] = (
          lambda q, k, v: fa.flash_attention(q, k, v), (q, q, q))
      out[f"flash causal gqa4 h{h} {dn}"] = (
          lambda q, k, v: fa.flash_attention(q, k, v, is_causal=True),
          (q, kv, kv))
    h = head_dims[-1]
    q = jax.ShapeDtypeStruct((1, seq_len, 8, h), dt)
    nt = seq_len // 128
    lay = bsp.local_block_layout(nt, nt, 128, 128, 512, 512)
    out[f"block-sparse window512 h{h} {dn}"] = (
        lambda q, k, v, lay=lay: bsp.block_sparse_attention(
            q, k, v, lay, block_q=128, block_kv=128), (q, q, q))
    img = jax.ShapeDtypeStruct((1, 64, 64, 4, 64), dt)
    out[f"neighborhood2d 64x64 k7 h64 {dn}"] = (
        lambda q, k, v: nb.neighborhood_attention(q, k, v, (7, 7)),
        (img, img, img))
    ql = jax.ShapeDtypeStruct((1, seq_len, 8, 64), dt)
    out[f"causal_linear h64 {dn}"] = (
        lambda q, k, v: la.causal_linear_attention(q, k, v), (ql, ql, ql))
  return out


def markdown_table(rows, targets) -> str:
  """One line per (config, mode): GPU cells list shared KiB per kernel
  (fwd/dq/dkv), TPU cells the number of Mosaic kernels lowered."""
  cells = {}
  for r in rows:
    key = (r["config"], r["mode"])
    if "error" in r:
      cell = "error: " + r["error"].split(":")[0]
    elif r["target"].startswith("tpu"):
      cell = f"{len(r['kernels'])} lowered"
    else:
      cell = " / ".join(f"{k['shared'] / 1024:.0f}" for k in r["kernels"])
      cell += "" if r["fits"] else " (exceeds)"
    cells.setdefault(key, {})[r["target"]] = cell
  lines = ["| config | mode | " + " | ".join(targets) + " |",
           "|---|---|" + "---|" * len(targets)]
  for (config, mode), c in cells.items():
    lines.append(f"| {config} | {mode} | "
                 + " | ".join(c.get(t, "") for t in targets) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  F = flags.FLAGS
  rows = []
  cfgs = configs(F.seq_len, [int(h) for h in F.head_dims],
                 [jnp.dtype(d) for d in F.dtypes])
  t0 = time.time()
  for i, (name, (fn, args)) in enumerate(cfgs.items()):
    for mode, f in (("fwd", fn), ("fwd+bwd", _grad(fn))):
      for target in F.gpu_targets:
        row = dict(config=name, mode=mode, target=target)
        try:
          row["kernels"] = aot.compile_triton(f, *args, target=target)
          row["fits"] = all(k["shared"] <= k["max_shared"]
                            for k in row["kernels"])
        except Exception as e:  # noqa: BLE001 - report and go on
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
      for target in F.tpu_targets:
        row = dict(config=name, mode=mode, target=target)
        try:
          row["kernels"] = [dict(name=c) for c in aot.kernel_calls(
              aot.lower(f, *args, target=target))]
        except Exception as e:  # noqa: BLE001
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
    el = time.time() - t0
    print(f"[{i + 1}/{len(cfgs)}] {name}  {el:.0f}s elapsed, "
          f"ETA {el / (i + 1) * (len(cfgs) - i - 1):.0f}s", flush=True)
  results = dict(jax_version=jax.__version__, seq_len=F.seq_len, rows=rows)
  try:
    import triton
    results["triton_version"] = triton.__version__
  except ImportError:
    pass
  path = write_results(F.workdir, results)
  md = os.path.join(F.workdir, "table.md")
  with open(md, "w") as f:
    f.write(markdown_table(rows, list(F.gpu_targets) + list(F.tpu_targets)))
  print(f"\n{'config':36s} {'mode':8s} {'target':8s} kernels "
        "(name warps/stages shared KiB)")
  for r in rows:
    if "error" in r:
      desc = "ERROR " + r["error"][:90]
    elif r["target"].startswith("tpu"):
      desc = f"{len(r['kernels'])} Mosaic kernel(s) lowered"
    else:
      desc = "; ".join(
          f"{k['name']} {k['num_warps']}/{k['num_stages']} "
          f"{k['shared'] / 1024:.0f}" for k in r["kernels"])
      desc += "" if r["fits"] else "  EXCEEDS SHARED MEMORY"
    print(f"{r['config']:36s} {r['mode']:8s} {r['target']:8s} {desc}")
  print(f"wrote {path}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("seq_len", 4096, "Sequence length of the 1D configs.")
  flags.DEFINE_list("head_dims", ["64", "128", "256"], "Head dims.")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes.")
  flags.DEFINE_list("gpu_targets", ["h100", "a100"], "GPU targets.")
  flags.DEFINE_list("tpu_targets", ["tpu_v5e", "tpu_v4"], "TPU targets.")
  app.run(main)
