"""Ahead-of-time lowering of the kernels for a TPU or GPU, from any machine.

Pallas lowers a kernel to Mosaic (TPU) or Triton IR (GPU) in Python, before
XLA compiles anything; with an abstract device in scope
(`jax.sharding.use_abstract_mesh`) that lowering runs on a CPU-only machine.
This catches what would otherwise first fail on the accelerator: ops with no
lowering rule, block shapes the backend refuses, scalar tables that must live
in SMEM on TPU, and so on. It does not run anything (device compilation of
the Mosaic/Triton module happens in XLA on the device), so it complements,
and does not replace, running the kernels there.

  from pallas_kernels import aot, flash_attention
  lowered = aot.lower(lambda q, k, v: flash_attention(q, k, v), q, k, v,
                      target="h100")
  print(aot.kernel_calls(lowered))    # the Triton custom calls in the HLO

Inside `aot.target(...)` the kernels pick that platform's defaults (block
sizes, layout, compiler parameters), exactly as they would on the device.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable

import jax

# name -> (platform for lowering, device_kind, num_cores)
TARGETS = {
    "tpu_v4": ("tpu", "TPU v4", 2),
    "tpu_v5e": ("tpu", "TPU v5 lite", 1),
    "tpu_v5p": ("tpu", "TPU v5", 2),
    "tpu_v6e": ("tpu", "TPU v6 lite", 1),
    "a100": ("cuda", "NVIDIA A100-SXM4-80GB", 108),
    "h100": ("cuda", "NVIDIA H100 80GB HBM3", 132),
    "h200": ("cuda", "NVIDIA H200", 132),
}

_KERNEL_CALL = re.compile(
    r"custom_call @(tpu_custom_call|__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)")


def _resolve(target: str):
  if target not in TARGETS:
    raise ValueError(
        f"`target` must be one of {sorted(TARGETS)}, got {target!r}.")
  return TARGETS[target]


@contextlib.contextmanager
def target(name: str):
  """Context in which kernels are traced and lowered for device `name`."""
  platform, kind, cores = _resolve(name)
  dev = jax.sharding.AbstractDevice(
      device_kind=kind, num_cores=cores,
      platform="gpu" if platform == "cuda" else platform)
  mesh = jax.sharding.AbstractMesh(
      (1,), ("_aot",), (jax.sharding.AxisType.Explicit,),
      abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    yield platform


def lower(fn: Callable, *args, target: str = "h100"):
  """jax.jit(fn) traced and lowered for `target`; args may be ShapeDtypeStructs."""
  with globals()["target"](target) as platform:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))


def kernel_calls(lowered) -> list[str]:
  """Names of the Pallas kernel custom calls in a lowered module, in order."""
  return _KERNEL_CALL.findall(lowered.as_text())
