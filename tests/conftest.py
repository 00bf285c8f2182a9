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


def gpu_available() -> bool:
  import jax
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False
