"""The four-pattern section (experiments/bench_sections/four_pattern.py): its
support column is what the mechanisms do (tried call by call) and equals
attnjax.sequence.SUPPORT; it runs end to end on a tiny size."""

import types

import jax.numpy as jnp
import numpy as np

from attnjax import sequence as sq
from experiments.bench_sections import four_pattern as fp


def test_support_column_equals_support_table():
  cfg = fp._configs()
  got = {name: {p: fp.supported(name, p, t=64, cfg=cfg) for p in sq.PATTERNS}
         for name in sq.SUPPORT}
  assert got == sq.SUPPORT


def test_section_runs_on_a_tiny_size():
  flags = types.SimpleNamespace(four_pattern_lens="64", max_run_gib=2.0,
                                impls="linear_attention,efficient_attention")
  ctx = types.SimpleNamespace(
      quick=True, dtype=jnp.float32, repeats=1, flags=flags,
      log=lambda m: None,
      peak_memory_bytes=__import__(
          "experiments.bench_utils", fromlist=["x"]).peak_memory_bytes)
  rows = fp.run(ctx)
  sup = fp.support_table(rows)
  assert sup == {n: sq.SUPPORT[n] for n in ("efficient_attention",
                                             "linear_attention")}
  timed = [r for r in rows if r.get("impl") == "attnjax.sequence"]
  # linear: 4 patterns, efficient: 2 (noncausal only), one length each
  assert len(timed) == 6
  assert all(r["time_ms"] > 0 and r["ratio_vs_softmax"] > 0 and
             r["mem_mb"] > 0 for r in timed)
  cross = [r for r in timed if r["pattern"].endswith("cross")]
  assert all(r["kv_len"] == 32 for r in cross)
  table = fp.markdown(rows)
  assert "| `efficient_attention` | yes:" in table and "| no |" in table
  figs = fp.plot(rows)
  assert figs and figs[0][1].endswith(".png")
  assert np.isfinite([r["ratio_vs_softmax"] for r in timed]).all()
