"""Softmax attention: attnjax backends vs jax.nn.dot_product_attention.

For each (batch, heads, head_dim, seq_len), causality (`--causal`: false,
true or both) and mode (fwd, fwd_bwd) it times every implementation that can
serve the call here round-robin with an f32 matmul (`MATMUL_N`^3, the
machine's matmul rate at that moment), and reads XLA's compiled memory.
Calls whose compiled memory exceeds `--max_run_gib` are not executed (their
memory is still reported: e.g. the xla path at S=32768 needs the full
[B, N, S, S] logits). `ratio_vs_jax_nn` and `ratio_vs_matmul` (achieved
attention GFLOP/s over the matmul's) are measured in the same run.

Nominal FLOPs: 4 B N S^2 H forward, 3.5x that forward+backward (two matmuls
forward, five backward; the chunked backward's recomputation of the logits
is not counted), halved when causal.

Targets (issue 22, at S >= 2048): chunked forward >= 0.7 and forward+backward
>= 0.5 of the matmul rate; causal chunked <= 0.55x the non-causal time;
causal attnjax 'xla' compiled memory <= jax.nn's (within 5%).

jax.nn(xla) vs attnjax(xla): both materialize the [B, N, T, S] logits and
run the same kind of XLA ops; at S=256 a call takes ~2-3 ms, where the old
one-call-after-another medians on a shared 2-core machine differed up to 2x
from scheduling noise alone (a burst of load hit one implementation's
repeats and not the other's). Timed round-robin (here), their ratio at
S=256 was 0.89-1.21 across fwd/fwd+bwd and causal/non-causal in a 2-repeat
run at load average 22 (docs/benchmarks/cpu_softmax.md): no systematic gap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import attnjax
from experiments import bench_utils

MATMUL_N = 2048
MATMUL_N_QUICK = 512


def _impls(ctx):
  impls = {
      "jax.nn(xla)": functools.partial(jax.nn.dot_product_attention,
                                       implementation="xla"),
      "attnjax(xla)": functools.partial(attnjax.dot_product_attention,
                                        implementation="xla"),
      "attnjax(chunked)": functools.partial(attnjax.dot_product_attention,
                                            implementation="chunked"),
  }
  if jax.default_backend() == "gpu":
    impls["jax.nn(cudnn)"] = functools.partial(jax.nn.dot_product_attention,
                                               implementation="cudnn")
  if jax.default_backend() != "cpu" or ctx.flags.include_interpret:
    impls["attnjax(pallas)"] = functools.partial(attnjax.dot_product_attention,
                                                 implementation="pallas")
  only = [s for s in ctx.flags.impls.split(",") if s] if ctx.flags.impls else None
  if only:
    impls = {k: v for k, v in impls.items() if any(o in k for o in only)}
  return impls


def _causal_values(flag):
  return {"false": (False,), "true": (True,), "both": (False, True)}[
      str(flag).lower()]


def run(ctx):
  f = ctx.flags
  rows = []
  dtype = ctx.dtype
  seq_lens = [int(s) for s in f.seq_lens.split(",")]
  head_dims = [int(s) for s in f.head_dims.split(",")]
  batches = [int(s) for s in f.batch_sizes.split(",")]
  modes = f.modes.split(",")
  impls = _impls(ctx)
  max_bytes = f.max_run_gib * (1 << 30)
  mm_n = MATMUL_N_QUICK if ctx.quick else MATMUL_N
  ka, kb = jax.random.split(jax.random.key(1))
  mm_args = (jax.random.normal(ka, (mm_n, mm_n), jnp.float32),
             jax.random.normal(kb, (mm_n, mm_n), jnp.float32))
  mm_fn = lambda a, b: a @ b
  for b in batches:
    for hd in head_dims:
      for s in seq_lens:
        key = jax.random.key(0)
        kq, kk, kv = jax.random.split(key, 3)
        shape = (b, s, f.heads, hd)
        q = jax.random.normal(kq, shape, dtype)
        k = jax.random.normal(kk, shape, dtype)
        v = jax.random.normal(kv, shape, dtype)
        for causal in _causal_values(f.causal):
          for mode in modes:
            calls, group = {}, []
            for name, fn in impls.items():
              call = (lambda q, k, v, fn=fn, c=causal: fn(q, k, v,
                                                          is_causal=c))
              if mode == "fwd_bwd":
                call = ctx.fwd_bwd(call)
              row = dict(section="softmax", name="dot_product_attention",
                         impl=name, mode=mode, batch=b, heads=f.heads,
                         head_dim=hd, seq_len=s, causal=causal,
                         dtype=jnp.dtype(dtype).name)
              try:
                mem = ctx.peak_memory_bytes(call, q, k, v)
              except NotImplementedError as e:
                ctx.log(f"skip {name} {mode} S={s}: {e}")
                continue
              row["mem_mb"] = mem / 2**20
              if mem > max_bytes:
                row["time_ms"] = None
                row["note"] = f"not run: needs {mem / 2**30:.1f} GiB"
              else:
                calls[name] = (call, (q, k, v))
              group.append(row)
            if calls:
              calls["matmul"] = (mm_fn, mm_args)
              med, _, cpu = bench_utils.interleaved_times(
                  calls, repeats=ctx.repeats, cpu=True)
              mm_rate = 2 * mm_n**3 / med["matmul"] / 1e9
              mm_rate_cpu = 2 * mm_n**3 / cpu["matmul"] / 1e9
              base = med.get("jax.nn(xla)")
              for row in group:
                t = med.get(row["impl"])
                if t is None:
                  continue
                flops = 4 * b * f.heads * s * s * hd * (
                    3.5 if mode == "fwd_bwd" else 1)
                if causal:
                  flops /= 2
                row["time_ms"] = 1e3 * t
                row["gflops_per_s"] = flops / t / 1e9
                row["matmul_gflops_per_s"] = mm_rate
                row["ratio_vs_matmul"] = row["gflops_per_s"] / mm_rate
                # Per process CPU second (all threads; time spent waiting
                # for a core not counted): the work efficiency, meaningful
                # on a loaded machine where wall times measure the
                # scheduler. An upper bound of the idle-machine wall ratio
                # (equal when both use every core all the time).
                row["cpu_ms"] = 1e3 * cpu[row["impl"]]
                row["ratio_vs_matmul_cpu"] = (flops / cpu[row["impl"]] / 1e9
                                              / mm_rate_cpu)
                if base is not None:
                  row["ratio_vs_jax_nn"] = t / base
            for row in group:
              ctx.log(" ".join(f"{k_}={v_}" for k_, v_ in row.items()))
            rows.extend(group)
  return rows


def targets(rows):
  """Issue 22 item 4 checks on rows measured in this run."""
  out = []
  idx = {(r["impl"], r["mode"], r["causal"], r["seq_len"], r["batch"],
          r["head_dim"]): r for r in rows}
  for r in rows:
    if r["impl"] != "attnjax(chunked)" or r["seq_len"] < 2048:
      continue
    tag = (f"S={r['seq_len']} {'causal' if r['causal'] else 'non-causal'} "
           f"{r['mode']}")
    if r.get("ratio_vs_matmul") is not None:
      want = 0.7 if r["mode"] == "fwd" else 0.5
      cpu = r.get("ratio_vs_matmul_cpu")
      out.append(dict(
          target=f"chunked {tag} >= {want} of the matmul rate (wall)",
          value=(round(r["ratio_vs_matmul"], 3) if cpu is None else
                 f"{r['ratio_vs_matmul']:.3f} (per CPU second: {cpu:.3f})"),
          ok=r["ratio_vs_matmul"] >= want))
    if r["causal"]:
      nc = idx.get((r["impl"], r["mode"], False, r["seq_len"], r["batch"],
                    r["head_dim"]))
      if nc and nc.get("time_ms") and r.get("time_ms"):
        ratio = r["time_ms"] / nc["time_ms"]
        value = round(ratio, 3)
        if nc.get("cpu_ms") and r.get("cpu_ms"):
          value = (f"{ratio:.3f} (CPU time: "
                   f"{r['cpu_ms'] / nc['cpu_ms']:.3f})")
        out.append(dict(target=f"chunked {tag} time <= 0.55x non-causal "
                        "(wall)", value=value, ok=ratio <= 0.55))
  for r in rows:
    if r["impl"] != "attnjax(xla)" or not r["causal"]:
      continue
    ref = idx.get(("jax.nn(xla)", r["mode"], True, r["seq_len"], r["batch"],
                   r["head_dim"]))
    if ref and ref.get("mem_mb") and r.get("mem_mb") and r["seq_len"] >= 2048:
      ratio = r["mem_mb"] / ref["mem_mb"]
      out.append(dict(
          target=(f"attnjax(xla) causal S={r['seq_len']} {r['mode']} memory "
                  "<= 1.05x jax.nn's"),
          value=f"{r['mem_mb']:.0f} vs {ref['mem_mb']:.0f} MiB",
          ok=ratio <= 1.05))
  return out


_STYLES = {"jax.nn(xla)": ("black", "o"), "attnjax(xla)": ("tab:blue", "s"),
           "attnjax(chunked)": ("tab:red", "^"),
           "jax.nn(cudnn)": ("tab:green", "D"),
           "attnjax(pallas)": ("tab:purple", "v")}


def plot(rows):
  import matplotlib.pyplot as plt
  figs = []
  for mode in sorted({r["mode"] for r in rows}):
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for impl in sorted({r["impl"] for r in rows}):
      color, marker = _STYLES.get(impl, (None, "x"))
      for causal in (False, True):
        pts = sorted((r["seq_len"], r["time_ms"]) for r in rows
                     if r["impl"] == impl and r["mode"] == mode
                     and r["causal"] == causal and r.get("time_ms"))
        if pts:
          ax.plot(*zip(*pts), marker=marker, color=color,
                  linestyle="--" if causal else "-",
                  label=f"{impl}{' causal' if causal else ''}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("time (ms)")
    ax.set_title(f"softmax attention, {mode} (dashed: causal)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    figs.append((fig, f"softmax_{mode}.png"))
  return figs
