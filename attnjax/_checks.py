"""Input validation shared by every primitive.

Errors name the offending argument and the shapes/values received, so a user
reading a traceback knows which array to fix.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# The q/k/v layout check, segment ids, integer scalars and window
# normalisation are rules the kernels share: one definition, in
# pallas_kernels/_rules.py. (Backend choice is attnjax._dispatch.)
from pallas_kernels._rules import (check_floating, check_ids,  # noqa: F401
                                   check_qkv, check_rank, check_segment_ids,
                                   is_int, normalize_window)


def check_broadcastable(name: str, x, target: Sequence[int], *,
                        what: str = "[batch, heads, q_len, kv_len]") -> None:
  """Checks that `x` broadcasts (numpy rules, right-aligned) to `target`."""
  shape = tuple(x.shape)
  target = tuple(target)
  if len(shape) > len(target):
    raise ValueError(
        f"`{name}` with shape {shape} has more dims than {what}={target}.")
  for s, t in zip(reversed(shape), reversed(target)):
    if s != 1 and s != t:
      raise ValueError(
          f"`{name}` with shape {shape} is not broadcastable to {what}={target}.")


def as_array(name: str, x):
  """jax/NumPy arrays pass through; Python lists/tuples/scalars are converted
  with jnp.asarray; anything else raises TypeError naming `name`."""
  if isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, "__jax_array__"):
    return x
  if isinstance(x, (list, tuple, int, float, np.generic)) and not isinstance(
      x, (bool, np.bool_)):
    try:
      return jnp.asarray(x)
    except (TypeError, ValueError) as e:
      raise TypeError(
          f"`{name}` must be an array (or a nested list of numbers), could "
          f"not convert it: {e}") from None
  raise TypeError(
      f"`{name}` must be an array, got {type(x).__name__}.")


def check_int(name: str, x, *, min_value=None, allow_none: bool = False):
  """An integer scalar (Python, NumPy or concrete JAX) -> Python int.

  Floats (even 2.0), bools and strings raise TypeError naming `name`; values
  below `min_value` raise ValueError.
  """
  if x is None and allow_none:
    return None
  if not is_int(x):
    raise TypeError(
        f"`{name}` must be an integer, got {x!r} ({type(x).__name__}).")
  v = int(x)
  if min_value is not None and v < min_value:
    raise ValueError(f"`{name}` must be >= {min_value}, got {v}.")
  return v


def check_rate(name: str, x) -> float:
  """A probability in [0, 1) (dropout rates) -> float; else ValueError."""
  try:
    v = float(x)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be a number in [0, 1), got {x!r}.") from None
  if not 0.0 <= v < 1.0:   # also refuses nan
    raise ValueError(f"`{name}` must be in [0, 1), got {x!r}.")
  return v


def check_scale(name: str, scale):
  """None or a finite real number -> float (or None); else ValueError."""
  if scale is None:
    return None
  if isinstance(scale, jax.core.Tracer):
    raise TypeError(
        f"`{name}` must be a concrete Python/NumPy number, not a traced value.")
  try:
    v = float(scale)
  except (TypeError, ValueError):
    raise TypeError(f"`{name}` must be a real number, got {scale!r}.") from None
  if not math.isfinite(v):
    raise ValueError(f"`{name}` must be finite, got {scale!r}.")
  return v


def pallas_refuses(mechanism: str, why: str):
  """NotImplementedError for an argument the Pallas kernel does not take."""
  return NotImplementedError(
      f"{mechanism}(implementation='pallas') {why}; use implementation='xla'.")


