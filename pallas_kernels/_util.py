"""Small helpers shared by the kernels (no attnjax imports)."""

from __future__ import annotations

import math
from typing import Optional

import jax


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """interpret=None -> True on CPU (no Pallas compiler there), else False."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(x: int, m: int) -> int:
  return cdiv(x, m) * m


def next_pow2(x: int) -> int:
  return 1 << max(0, int(x) - 1).bit_length()


def lcm(a: int, b: int) -> int:
  return a * b // math.gcd(a, b)


def check_rank(name: str, x, rank: int, what: str) -> None:
  if x.ndim != rank:
    raise ValueError(
        f"`{name}` must have rank {rank} ({what}), got shape "
        f"{tuple(x.shape)}.")


def check_float(name: str, x) -> None:
  if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
    raise ValueError(f"`{name}` must be floating point, got dtype {x.dtype}.")
