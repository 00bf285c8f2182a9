"""Pytest configuration shared by all tests."""

import os
import sys

# Run from any directory: make `tests.*` and the repo packages importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

os.environ.setdefault("MPLBACKEND", "Agg")


def _share_compiles_within_this_run():
  """One persistent XLA compilation cache for the whole test run.

  Most of the suite's time is XLA compiling small programs, and many are the
  same program compiled again: the same initializer shapes in every model,
  a check helper's fresh `jax.jit(functools.partial(...))` per call, each
  xdist worker compiling what the other already did, a binary run three
  times (uninterrupted / killed / resumed) in three processes. The cache
  keys on the lowered program and the compile options, so a hit returns the
  executable a fresh compile would build: tests check the same programs,
  just compiled once. Set through the environment before jax is imported,
  so the xdist workers, binaries, multi-process runs and notebook kernels
  started by tests share it. The directory lives for this run only (removed
  at exit by the process that made it); an explicit $JAX_COMPILATION_CACHE_DIR
  is left alone; ATTNJAX_TEST_XLA_CACHE=0 turns it off.

  No size limit, on purpose: with `jax_compilation_cache_max_size` set, JAX's
  LRU cache takes a file lock and lists and stats every entry (reading its
  atime file) on every write, and locks on every read: O(entries) per
  compile, quadratic over a suite. Measured (jax 0.12, jax._src.lru_cache.
  LRUCache holding 3000 entries of 20 kB): 50 writes + 50 reads cost 11.1
  CPU-s (33.6 s wall, load ~6) with an 8 GiB limit, 0.007 CPU-s without.
  That is most likely why the first full run with the cache (then with the
  limit) took 4231 s against 3349 s without. A reader that meets a
  half-written entry (no lock now) gets a warning and compiles (jax's
  _cache_read falls back on any read error). Entries are a few kB to tens
  of kB (compressed CPU executables). Net effect measured without the
  limit, CI=true, one process (user+sys CPU incl. the binaries' processes):
  `pytest tests/test_binaries_resume.py -k vision_classify` (the binary run
  three times) 67.4 CPU-s off, 63.7 CPU-s on (loads 15.7 / 11.7).
  """
  if (os.environ.get("JAX_COMPILATION_CACHE_DIR")
      or os.environ.get("ATTNJAX_TEST_XLA_CACHE", "1") != "1"):
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix="attnjax-test-xla-cache-")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  # Under load a compile's wall time is inflated; cache anything not tiny.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  if "jax" in sys.modules:          # imported before this file: tell it too
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


_share_compiles_within_this_run()


def _cheaper_llvm_for_tests():
  """XLA:CPU's LLVM back end at optimization level 1 instead of 2.

  The suite's programs are tiny, so nearly all of its time is compiling them,
  and most of a CPU compile is LLVM optimizing the emitted code. Level 1
  skips LLVM's expensive passes (loop vectorization and the like); XLA's own
  HLO optimizations (fusion, algebraic simplification, layout) still run.
  What a test checks does not change: every assertion compares against its
  reference as before; only how fast the compiled loops run changes, which
  for test-sized arrays is noise. Measured on this machine (CPU-s, one
  process, same load): creating the `shvit` tiny model (28 truncated-normal
  initializer compiles) 24.5 -> 10.3 CPU-s with bitwise identical
  parameters; a sample of the suite (runs/t1/ab_opt.sh: the shvit vision
  tests, two small training tests, tests/spatial/test_atlas.py,
  tests/sequence/test_multipole.py, TestXla values/grads; 24 tests, CI=true,
  load ~9.5 both) 211.1 CPU-s at level 2 -> 156.3 at level 1 (-26%); the
  training tests got faster too (low_rank_bottleneck 28.2 -> 17.5 CPU-s).
  Appended to $XLA_FLAGS (so subprocesses, multi-device children and
  notebook kernels get it too); an explicit --xla_backend_optimization_level
  is left alone; ATTNJAX_TEST_XLA_OPT=0 turns it off.
  """
  if os.environ.get("ATTNJAX_TEST_XLA_OPT", "1") != "1":
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" in flags:
    return
  os.environ["XLA_FLAGS"] = (
      flags + " --xla_backend_optimization_level=1").strip()


_cheaper_llvm_for_tests()


def gpu_available() -> bool:
  import jax
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False
