"""experiments.bench_attention plumbing (no timing assertions): the
--sections check, exponent fits, target flags, table columns, plot styles."""

import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import bench_attention, bench_utils
from experiments.bench_sections import sequence, softmax, spatial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_section_lists_the_choices():
  with pytest.raises(ValueError, match="nosuch") as e:
    bench_attention.parse_sections("softmax,nosuch")
  for name in ("softmax", "sequence", "spatial", "crossover"):
    assert name in str(e.value)
  assert bench_attention.parse_sections("spatial, softmax") == ["spatial",
                                                               "softmax"]


def test_unknown_section_on_the_command_line_is_a_clear_error():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_attention", "--sections=nosuch"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode != 0
  assert "Traceback" not in out and "ModuleNotFoundError" not in out, out
  assert "unknown section(s) 'nosuch'" in out
  assert "crossover, four_pattern, sequence, softmax, spatial" in out


def test_loglog_slope_recovers_the_exponent():
  xs = np.array([784, 3136, 12544])
  assert bench_utils.loglog_slope(xs, 3.0 * xs ** 1.3) == pytest.approx(1.3)
  assert bench_utils.loglog_slope([1, 2, 4], [5, 5, 5]) == pytest.approx(0.0)
  assert bench_utils.loglog_slope([8], [1.0]) is None


def test_interleaved_times_runs_every_call_each_repeat():
  calls = {"a": (lambda x: x + 1, (np.ones(3),)),
           "b": (lambda x: x * 2, (np.ones(3),))}
  med, samples, cpu = bench_utils.interleaved_times(calls, repeats=3, cpu=True)
  assert set(med) == set(cpu) == {"a", "b"}
  assert all(len(s) == 3 and min(s) > 0 for s in samples.values())


def test_fwd_bwd_backpropagates_a_data_dependent_cotangent():
  """Not the constant ones of sum(out), which XLA can hoist out of a
  backward loop: the cotangent of out is sin(out)."""
  x = np.linspace(-2.0, 2.0, 7).astype(np.float32)
  (grad,) = bench_utils.fwd_bwd(lambda a: 3.0 * a, argnums=(0,))(x)
  np.testing.assert_allclose(grad, 3.0 * np.sin(3.0 * x), rtol=1e-6)


def test_table_has_a_causal_column():
  rows = [dict(section="sequence", name="x", impl="attnjax.sequence",
               mode="fwd", causal=True, seq_len=1024, time_ms=1.0),
          dict(section="sequence", name="y", impl="attnjax.sequence",
               mode="fwd", causal=False, seq_len=1024, time_ms=2.0)]
  lines = bench_attention.format_table(rows).splitlines()
  header = lines[0].split()
  assert "causal" in header
  col = header.index("causal")
  assert [ln.split()[col] for ln in lines[2:]] == ["True", "False"]


def test_sequence_targets_flag_superlinear_mechanisms():
  fit = lambda name, mode, e, ce, **kw: dict(
      impl="fit", name=name, mode=mode, exponent=e, cpu_exponent=ce,
      fit_range="1024..65536", seq_len=65536,
      linear_in_theory=name.startswith(sequence.LINEAR_IN_THEORY), **kw)
  rows = [fit("linear_attention", "fwd", 1.0, 1.0),
          fit("linear_attention", "fwd_bwd", 1.33, 1.30, bwd_over_fwd=13.0),
          fit("agent_attention(64 agents)", "fwd", 1.2, 1.05),
          fit("routing_attention(region=256,top4)", "fwd", 1.6, 1.6)]
  got = {t["target"]: t["ok"] for t in sequence.targets(rows)}
  assert got == {
      "linear_attention fwd exponent over 1024..65536 <= 1.05": True,
      "linear_attention fwd_bwd exponent over 1024..65536 <= 1.05": False,
      "linear_attention fwd+bwd <= 3.0x fwd at S=65536": False,
      # Wall-time fit 1.2 but CPU-time 1.05: load, not scaling.
      "agent_attention(64 agents) fwd exponent over 1024..65536 <= 1.1": True,
  }   # routing is not linear in theory: no target


def test_spatial_fits_and_targets():
  rows = []
  for size in (14, 28, 56, 112):
    for name, e in (("neighborhood_k7", 1.3), ("window_w7", 1.0),
                    ("dense", 2.0)):
      for mode in ("fwd", "fwd_bwd"):
        rows.append(dict(name=name, mode=mode, pixels=size * size,
                         time_ms=0.01 * (size * size) ** e))
  fits = spatial._fits(rows)
  by = {(f["name"], f["mode"]): f for f in fits}
  assert by[("neighborhood_k7", "fwd")]["exponent"] == pytest.approx(1.3)
  assert by[("dense", "fwd")]["exponent"] == pytest.approx(2.0)
  assert by[("window_w7", "fwd")]["image_size"] == "28^2..112^2"
  flagged = {t["target"].split()[0]: t["ok"] for t in spatial.targets(fits)}
  assert flagged == {"neighborhood_k7": False, "window_w7": True}


def test_spatial_plot_styles_are_distinct():
  import jax
  names = list(spatial._mechanisms(28)) + ["biformer_r2_top4"]
  assert len(names) >= 13
  styles = spatial._styles(names)
  assert len(set(styles.values())) == len(names)
  del jax


def test_spatial_entries_take_their_constants_as_arguments():
  """No bench entry closes over an array (XLA constant-folded what was
  computed from closed-over weights/masks: > 8 s of compile at 56x56); the
  arrays are the entry's third element, passed after q, k, v. The old
  entries closed over the mask, the GPSA and CRPE weights."""
  import functools
  import jax
  import jax.numpy as jnp

  def closed_arrays(fn):
    found = []
    if isinstance(fn, functools.partial):
      found += [a for a in list(fn.args) + list(fn.keywords.values())
                if isinstance(a, (np.ndarray, jax.Array))]
      fn = fn.func
    for cell in getattr(fn, "__closure__", None) or ():
      if isinstance(cell.cell_contents, (np.ndarray, jax.Array)):
        found.append(cell.cell_contents)
    return found

  shape = (1, 14, 14, spatial.HEADS, spatial.HEAD_DIM)
  q = jnp.ones(shape, jnp.float32)
  mechs = spatial._mechanisms(14)
  bad = [name for name, (fn, *_) in mechs.items() if closed_arrays(fn)]
  assert not bad, bad
  for name in ("dense_masked_na", "gpsa", "coat_factorized_crpe3",
               "ptv3_hilbert_p64"):
    fn, _, consts = mechs[name]
    jax.eval_shape(fn, q, q, q, *consts)


def test_softmax_targets():
  def row(impl, mode, causal, t, ratio=None, mem=None):
    return dict(impl=impl, mode=mode, causal=causal, seq_len=4096, batch=1,
                head_dim=64, time_ms=t, ratio_vs_matmul=ratio, mem_mb=mem)
  rows = [row("attnjax(chunked)", "fwd", False, 100.0, 0.75),
          row("attnjax(chunked)", "fwd", True, 60.0, 0.6),
          row("attnjax(xla)", "fwd_bwd", True, 1.0, mem=2128.0),
          row("jax.nn(xla)", "fwd_bwd", True, 1.0, mem=1616.0)]
  got = [(t["target"], t["ok"]) for t in softmax.targets(rows)]
  assert ("chunked S=4096 non-causal fwd >= 0.7 of the matmul rate (wall)",
          True) in got
  assert ("chunked S=4096 causal fwd >= 0.7 of the matmul rate (wall)",
          False) in got
  assert ("chunked S=4096 causal fwd time <= 0.55x non-causal (wall)",
          False) in got
  assert ("attnjax(xla) causal S=4096 fwd_bwd memory <= 1.05x jax.nn's",
          False) in got


def test_load_note_mentions_shared_cores_only_above_the_cpu_count():
  low = bench_attention.load_note({"loadavg_1m": 1.3, "cpu_count": 2})
  assert "1.3 (1 min) on 2 CPUs" in low
  assert "above the CPU count" not in low
  high = bench_attention.load_note({"loadavg_1m": 5.2, "cpu_count": 2})
  assert "above the CPU count" in high and "5.2" in high
