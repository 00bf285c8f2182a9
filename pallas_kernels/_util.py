"""Small helpers shared by the kernels (no attnjax imports)."""

from __future__ import annotations

import math
from typing import Optional

import jax
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plt

from pallas_kernels._rules import cdiv, round_up  # noqa: F401  (one definition)


def target_platform() -> str:
  """'cpu' | 'gpu' | 'tpu': the platform kernels are being built for.

  That is the abstract device of an active `jax.sharding.use_abstract_mesh`
  (how `pallas_kernels.aot` lowers for a TPU or GPU from a CPU-only machine),
  else `jax.default_backend()`.
  """
  try:
    from jax._src import mesh as mesh_lib
    dev = mesh_lib.get_abstract_mesh().abstract_device
  except (ImportError, AttributeError):
    dev = None
  if dev is not None:
    return {"cuda": "gpu", "rocm": "gpu"}.get(dev.platform, dev.platform)
  return jax.default_backend()


def resolve_interpret(interpret: Optional[bool]) -> bool:
  """interpret=None -> True on CPU (no Pallas compiler there), else False."""
  if interpret is None:
    return target_platform() == "cpu"
  return bool(interpret)


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


def compiler_params(platform: str, interpret: bool, *, grid_rank: int,
                    num_warps: int = 4, num_stages: int = 2):
  """Backend parameters for a portable pallas_call (None in interpret mode
  and on CPU).

  GPU: the Pallas Triton lowering, chosen explicitly (JAX 0.10 would
  otherwise pick Mosaic GPU, whose warpgroup model these kernels do not
  target, and which e.g. stages a whole-sequence block in shared memory).
  TPU: every grid axis 'parallel' (each program owns its output tile; lets
  megacore chips split the grid).
  """
  if interpret:
    return None
  if platform == "gpu":
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if platform == "tpu":
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * grid_rank)
  return None
