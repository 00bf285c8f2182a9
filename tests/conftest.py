"""Pytest configuration shared by all tests."""

import os
import sys

# Run from any directory: make `tests.*` and the repo packages importable.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

os.environ.setdefault("MPLBACKEND", "Agg")


def gpu_available() -> bool:
  import jax
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False
