"""The three strict JAX modes some users (and JAX's own tests) run under.

    from tests.strict_modes import STRICT_MODES, strict_mode

    @pytest.mark.parametrize("mode", STRICT_MODES)
    def test_x(mode):
      with strict_mode(mode):
        ...   # every op inside runs with that mode on

Modes:
  'rank_promotion'   jax.numpy_rank_promotion('raise'): no implicit rank
                     broadcasting (x[2, 3] + y[3] raises).
  'dtype_promotion'  jax.numpy_dtype_promotion('strict'): no implicit dtype
                     promotion (float32 * bool raises).
  'debug_infs'       jax.debug_infs(True): any op (eager) or jitted
                     computation whose output holds an inf raises
                     FloatingPointError.

  'all'              the three at once. Each mode only adds errors (none
                     changes a value), so a call passes under 'all' exactly
                     when it passes under each mode: CI runs the strict-mode
                     tests once under 'all' (`modes_for_this_run()`),
                     a local run under each mode separately.

`strict_mode(None)` (or '' / 'none') is a no-op, so a test can be
parametrized over `(None,) + STRICT_MODES`. `env_strict_mode()` reads the
`ATTNJAX_STRICT_MODE` environment variable (one of the names above, or
unset): the shared softmax suite (tests/softmax_base.py) runs every test
under that mode, so CI can run the whole suite in each mode with e.g.
`ATTNJAX_STRICT_MODE=debug_infs pytest tests/test_softmax.py`.

Caches: jit caches are keyed on these config values, so switching modes
inside one process recompiles rather than reusing a non-strict trace.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import jax

STRICT_MODES = ("rank_promotion", "dtype_promotion", "debug_infs")
ALL = "all"
ENV_VAR = "ATTNJAX_STRICT_MODE"


def modes_for_this_run() -> tuple:
  """The modes a strict-mode test is parametrized over: each of
  STRICT_MODES locally; under CI (the `CI` environment variable) the single
  combined mode 'all', one compile per case instead of three."""
  return (ALL,) if os.environ.get("CI") else STRICT_MODES


def includes(mode: Optional[str], which: str) -> bool:
  """Whether `mode` turns on `which` (one of STRICT_MODES)."""
  return mode == which or mode == ALL


def _context(mode: Optional[str]):
  if mode in (None, "", "none"):
    return contextlib.nullcontext()
  if mode == "rank_promotion":
    return jax.numpy_rank_promotion("raise")
  if mode == "dtype_promotion":
    return jax.numpy_dtype_promotion("strict")
  if mode == "debug_infs":
    return jax.debug_infs(True)
  if mode == ALL:
    return all_strict_modes()
  raise ValueError(
      f"unknown strict mode {mode!r}; expected one of {STRICT_MODES}, "
      f"{ALL!r} or None.")


@contextlib.contextmanager
def strict_mode(mode: Optional[str]):
  """Context manager enabling one strict mode (None: nothing)."""
  with _context(mode):
    yield


@contextlib.contextmanager
def all_strict_modes():
  """All three modes at once."""
  with strict_mode("rank_promotion"), strict_mode("dtype_promotion"), \
      strict_mode("debug_infs"):
    yield


def env_strict_mode() -> Optional[str]:
  """The mode named by $ATTNJAX_STRICT_MODE (validated), or None."""
  mode = os.environ.get(ENV_VAR, "").strip() or None
  if mode == "none":
    mode = None
  if mode is not None and mode not in STRICT_MODES + (ALL,):
    raise ValueError(f"${ENV_VAR}={mode!r}; expected one of {STRICT_MODES}, "
                     f"{ALL!r} or unset.")
  return mode
