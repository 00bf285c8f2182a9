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


# ----------------------------------------------------------------------------
# GPU: compiling the lowered Triton modules to cubin (needs the `triton` pip
# package, not a GPU)
# ----------------------------------------------------------------------------

# Shared memory per block (bytes) by compute capability.
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_CAPABILITY = {"a100": 80, "h100": 90, "h200": 90}


@contextlib.contextmanager
def _capture_triton_modules(sink: list):
  """Records (name, TTIR text, num_warps, num_stages) of every Pallas kernel
  lowered to Triton inside the block. Uses a private JAX hook
  (jax._src.pallas.triton); raises ImportError where it is missing."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  orig_lower = reg.lowering.lower_jaxpr_to_triton_module
  orig_rule = reg.pallas_call_lowering

  def lower_module(*args, **kwargs):
    res = orig_lower(*args, **kwargs)
    sink.append({"ttir": res.module.operation.get_asm(
        enable_debug_info=False)})
    return res

  def rule(ctx, *in_nodes, compiler_params, **params):
    n = len(sink)
    out = orig_rule(ctx, *in_nodes, compiler_params=compiler_params, **params)
    for rec in sink[n:]:
      rec["num_warps"] = compiler_params.num_warps or 4
      rec["num_stages"] = compiler_params.num_stages or 3
      rec["name"] = params.get("name") or "kernel"
    return out

  reg.lowering.lower_jaxpr_to_triton_module = lower_module
  reg.pallas_call_lowering = rule
  from jax._src.pallas import core as pallas_core
  from jax._src.pallas.triton import core as triton_core
  pallas_core.register_lowering_rule(triton_core.CompilerParams, rule, "gpu")
  try:
    yield sink
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = orig_lower
    reg.pallas_call_lowering = orig_rule
    pallas_core.register_lowering_rule(triton_core.CompilerParams, orig_rule,
                                       "gpu")


def compile_triton(fn: Callable, *args, target: str = "h100") -> list[dict]:
  """Lowers `fn` for a GPU target and compiles each Pallas kernel's Triton
  module to cubin with the `triton` package (no GPU needed).

  Returns one dict per kernel: name, num_warps, num_stages, shared (bytes of
  shared memory per block), max_shared (the device's limit). Raises
  ImportError without `triton`, and triton's error when a module does not
  verify or compile (which is what XLA would hit on the device).
  """
  import os
  import tempfile

  import triton
  from triton.backends.compiler import GPUTarget

  if target not in _CAPABILITY:
    raise ValueError(f"`target` must be one of {sorted(_CAPABILITY)}, got "
                     f"{target!r}.")
  cc = _CAPABILITY[target]
  sink: list = []
  # Lowerings of inner jits are cached; a cached kernel would not pass
  # through the capture hook.
  jax.clear_caches()
  with _capture_triton_modules(sink):
    lower(fn, *args, target=target)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, rec in enumerate(sink):
      path = os.path.join(tmp, f"k{i}.ttir")
      with open(path, "w") as f:
        f.write(rec["ttir"])
      k = triton.compile(path, target=GPUTarget("cuda", cc, 32),
                         options={"num_warps": rec["num_warps"],
                                  "num_stages": rec["num_stages"]})
      results.append({"name": rec["name"], "num_warps": rec["num_warps"],
                      "num_stages": rec["num_stages"],
                      "shared": int(k.metadata.shared),
                      "max_shared": MAX_SHARED[cc]})
  return results
