"""Flash attention forward/backward written in Triton, called via jax-triton.

Three `@triton.jit` kernels: forward (saves the log-sum-exp), dQ (grid over
query tiles) and dK/dV (grid over key tiles, one program per *query* head;
the GQA group sum is done outside), joined by `jax.custom_vjp`. Layout
inside: heads-major contiguous [B, N, L, H]. Scope: [B, T, N, H] inputs (GQA
via N % K == 0), power-of-two head dim in {16, ..., 256}, value head dim
equal, causal (top-left aligned) or not, local windows (left, right) with
out-of-band tiles skipped, any T/S (masked tails), one dtype among
float16/bfloat16/float32. No bias, mask or segment ids (use the Pallas
kernels in flash.py for those).

Dependencies, all guarded so attnjax imports without any of them:
* `triton` alone defines the kernels and is enough for the two CPU checks
  below (`triton_interpret_available()`).
* `jax_triton` plus a GPU backend are needed to run them for real
  (`triton_available()` / `why_unavailable()`; `triton_flash_attention`
  raises NotImplementedError saying why where it cannot run).
JAX 0.11+ deprecates the Pallas *Triton* lowering in favour of Mosaic GPU and
points hand-written Triton users to jax-triton, which is what this file uses.

Every launch (grid, runtime scalars, constexprs, warps, stages, output
types) is computed once, by `_fwd_launch` / `_dq_launch` / `_dkv_launch`,
and consumed by three back ends:
* `jax_triton.triton_call` (GPU; the real path);
* Triton's CPU interpreter through `jax.pure_callback`
  (`triton_flash_attention(..., interpret=True)`), so the very same
  custom_vjp glue (delta = rowsum(dO*O) - dlse, GQA sum of dK/dV) runs on a
  CPU; `_HostTensor` and `_InterpreterScope` are the shims this needs;
* `compile_for_cuda`: `triton.compile` for an sm_80/sm_90 target on a
  machine without a GPU, with the signature jax-triton 0.4 would build.

What has been verified, and where (tests/test_triton.py):
* On CPU, in Triton 3.9's interpreter: values, lse and dQ/dK/dV (with an
  lse cotangent) against `flash.mha_reference` / `jax.grad` of it, under
  jit, float32 and bfloat16, causal and not, GQA and MQA, T != S (both
  ways, also causal), lengths the tiles do not divide, head dims 16/32/64,
  the default head-dim-64 launch, every load/store bounds-checked against
  its buffer. The interpreter is not the GPU: float32 dots are exact float32
  there (TF32 on the GPU), float32 -> bfloat16 casts truncate there
  (round-to-nearest-even on the GPU), programs run one after another, and
  it says nothing about speed.
* On CPU, with the nvidia backend of the `triton` wheel: all three kernels
  compile to cubin for sm_90 and sm_80 at `default_config`, with the
  signature jax_triton would use (pointers `*bf16`/`*fp16`/`*fp32` with
  16-byte divisibility, `i32` T/S, `fp32` scale), for head dims 64/128
  (bf16/fp16, causal or not), 16/32/256 (bf16) and 64/128/256 (fp32), and
  their shared memory fits the per-block limit (232448 bytes on H100/H200,
  166912 on A100).
* The kernel parameter order matches how jax_triton binds (input arrays,
  runtime scalars, then outputs). The first version of this file declared
  the outputs before T/S/scale, which jax_triton would have bound to the
  wrong parameters; it never ran anywhere.
* NOT verified: running through jax_triton on a real GPU (no GPU was
  available when this was written), and speed. The default block sizes /
  warps / stages are the usual Triton flash choices that compile and fit;
  they have not been timed. Benchmarks can pass other `TritonFlashConfig`s.
  Not vmappable on a GPU: jax_triton has no batching rule.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._rules import (cdiv, check_qkv, default_scale,
                                   normalize_window)

_TRITON_IMPORT_ERROR: Optional[str] = None
try:  # Guarded: attnjax and pallas_kernels work without triton.
  import triton
  import triton.language as tl
except Exception as e:  # ImportError, or a broken Triton install
  triton = tl = None
  _TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def _import_jax_triton():
  """(jax_triton module, None) or (None, why it cannot be imported)."""
  if _TRITON_IMPORT_ERROR is not None:
    return None, f"triton not importable ({_TRITON_IMPORT_ERROR})"
  try:
    import jax_triton as jt
  except Exception as e:  # ImportError, or a broken CUDA install
    return None, f"jax_triton not importable ({type(e).__name__}: {e})"
  return jt, None


def triton_interpret_available() -> bool:
  """True when `triton` imports: kernels defined, CPU checks possible."""
  return _TRITON_IMPORT_ERROR is None


def triton_available() -> bool:
  """True when jax-triton imports and the default backend is a GPU."""
  return why_unavailable() is None


def why_unavailable() -> Optional[str]:
  """None where `triton_flash_attention` can run on a GPU, else why not."""
  _, err = _import_jax_triton()
  if err is not None:
    return f"jax_triton/triton not importable: {err}"
  if jax.default_backend() != "gpu":
    return f"Triton kernels need a GPU (default backend {jax.default_backend()!r})"
  return None


# --------------------------------------------------------------------------
# Kernels. Parameter order: input arrays, runtime scalars, output arrays,
# constexprs. That order is what both jax_triton conventions bind: old
# versions append the output pointers after all positional args, 0.4+
# binds positional args in order and fills the remaining non-constexpr
# parameters with the outputs.
# --------------------------------------------------------------------------

if triton is not None:

  @triton.jit
  def _key_range(i, S, LEFT, RIGHT, BQ: tl.constexpr, BK: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[lo, hi) of the keys query tile i can see, lo a multiple of BK."""
    lo = 0
    hi = S
    if CAUSAL:
      hi = tl.minimum(S, (i + 1) * BQ)
    if WINDOW:  # keys i - LEFT .. i + RIGHT: only the tiles of the band
      lo = tl.maximum(i * BQ - LEFT, 0) // BK * BK
      hi = tl.minimum(hi, (i + 1) * BQ + RIGHT)
    return lo, hi

  @triton.jit
  def _load_rows(base, pos, offs_h, L, H: tl.constexpr):
    """Rows `pos` ([n]) of a [L, H] matrix at `base`; rows >= L read 0."""
    return tl.load(base + pos[:, None] * H + offs_h[None, :],
                   mask=pos[:, None] < L, other=0.0)

  @triton.jit
  def _visible(qpos, kpos, T, S, LEFT, RIGHT, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[BQ, BK] mask: query qpos[:, None] may attend key kpos[None, :]."""
    valid = (kpos[None, :] < S) & (qpos[:, None] < T)
    if CAUSAL:
      valid = valid & (kpos[None, :] <= qpos[:, None])
    if WINDOW:
      valid = valid & (kpos[None, :] >= qpos[:, None] - LEFT)
      valid = valid & (kpos[None, :] <= qpos[:, None] + RIGHT)
    return valid

  @triton.jit
  def _fwd_kernel(q_ptr, k_ptr, v_ptr, T, S, scale, LEFT, RIGHT, o_ptr,
                  lse_ptr, N: tl.constexpr, G: tl.constexpr, H: tl.constexpr,
                  BQ: tl.constexpr, BK: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):
    i = tl.program_id(0)
    bn = tl.program_id(1).to(tl.int64)  # b * N + n; 64-bit base offsets
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_q = i * BQ + tl.arange(0, BQ)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, H)
    q_base = q_ptr + bn * T * H
    k_base = k_ptr + bkv * S * H
    v_base = v_ptr + bkv * S * H
    qmask = offs_q[:, None] < T
    q = tl.load(q_base + offs_q[:, None] * H + offs_h[None, :], mask=qmask,
                other=0.0)
    m = tl.full((BQ,), -1e30, tl.float32)
    l = tl.zeros((BQ,), tl.float32)
    acc = tl.zeros((BQ, H), tl.float32)
    lo, hi = _key_range(i, S, LEFT, RIGHT, BQ, BK, CAUSAL, WINDOW)
    for start in range(lo, hi, BK):
      kk = start + offs_k
      k = _load_rows(k_base, kk, offs_h, S, H)
      v = _load_rows(v_base, kk, offs_h, S, H)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = _visible(offs_q, kk, T, S, LEFT, RIGHT, CAUSAL, WINDOW)
      s = tl.where(valid, s, -1e30)
      m_new = tl.maximum(m, tl.max(s, 1))
      p = tl.where(valid, tl.exp(s - m_new[:, None]), 0.0)
      alpha = tl.exp(m - m_new)
      l = alpha * l + tl.sum(p, 1)
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
      m = m_new
    has = l > 0.0
    l_safe = tl.where(has, l, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + bn * T * H + offs_q[:, None] * H + offs_h[None, :],
             out.to(o_ptr.dtype.element_ty), mask=qmask)
    lse = tl.where(has, m + tl.log(l_safe), float("-inf"))
    tl.store(lse_ptr + bn * T + offs_q, lse, mask=offs_q < T)

  @triton.jit
  def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, T, S,
                 scale, LEFT, RIGHT, dq_ptr, N: tl.constexpr, G: tl.constexpr,
                 H: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    i = tl.program_id(0)
    bn = tl.program_id(1).to(tl.int64)
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_q = i * BQ + tl.arange(0, BQ)
    offs_k = tl.arange(0, BK)
    offs_h = tl.arange(0, H)
    qmask = offs_q[:, None] < T
    row = bn * T * H + offs_q[:, None] * H + offs_h[None, :]
    k_base = k_ptr + bkv * S * H
    v_base = v_ptr + bkv * S * H
    q = tl.load(q_ptr + row, mask=qmask, other=0.0)
    do = tl.load(do_ptr + row, mask=qmask, other=0.0)
    lse = tl.load(lse_ptr + bn * T + offs_q, mask=offs_q < T, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(delta_ptr + bn * T + offs_q, mask=offs_q < T, other=0.0)
    dq = tl.zeros((BQ, H), tl.float32)
    lo, hi = _key_range(i, S, LEFT, RIGHT, BQ, BK, CAUSAL, WINDOW)
    for start in range(lo, hi, BK):
      kk = start + offs_k
      k = _load_rows(k_base, kk, offs_h, S, H)
      v = _load_rows(v_base, kk, offs_h, S, H)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = _visible(offs_q, kk, T, S, LEFT, RIGHT, CAUSAL, WINDOW)
      p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
      dp = tl.dot(do, tl.trans(v))
      ds = p * (dp - delta[:, None])
      dq += tl.dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + row, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=qmask)

  @triton.jit
  def _dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, T, S,
                  scale, LEFT, RIGHT, dk_ptr, dv_ptr, N: tl.constexpr,
                  G: tl.constexpr, H: tl.constexpr, BQ: tl.constexpr,
                  BK: tl.constexpr, CAUSAL: tl.constexpr,
                  WINDOW: tl.constexpr):
    # One program per (key tile, query head); dK/dV per query head (float32),
    # summed over the GQA group outside.
    j = tl.program_id(0)
    bn = tl.program_id(1).to(tl.int64)
    bkv = (bn // N) * (N // G) + (bn % N) // G
    offs_k = j * BK + tl.arange(0, BK)
    offs_q = tl.arange(0, BQ)
    offs_h = tl.arange(0, H)
    kmask = offs_k[:, None] < S
    krow = bkv * S * H + offs_k[:, None] * H + offs_h[None, :]
    k = tl.load(k_ptr + krow, mask=kmask, other=0.0)
    v = tl.load(v_ptr + krow, mask=kmask, other=0.0)
    dk = tl.zeros((BK, H), tl.float32)
    dv = tl.zeros((BK, H), tl.float32)
    lo = 0
    hi = T
    if CAUSAL:  # queries before this key tile's first key never see it
      lo = (j * BK) // BQ * BQ
    if WINDOW:  # queries j*BK - RIGHT .. (j+1)*BK - 1 + LEFT see this tile
      lo = tl.maximum(lo, tl.maximum(j * BK - RIGHT, 0) // BQ * BQ)
      hi = tl.minimum(T, (j + 1) * BK + LEFT)
    for start in range(lo, hi, BQ):
      qq = start + offs_q
      qmask = qq[:, None] < T
      row = bn * T * H + qq[:, None] * H + offs_h[None, :]
      q = tl.load(q_ptr + row, mask=qmask, other=0.0)
      do = tl.load(do_ptr + row, mask=qmask, other=0.0)
      lse = tl.load(lse_ptr + bn * T + qq, mask=qq < T, other=0.0)
      lse = tl.where(lse == float("-inf"), 0.0, lse)
      delta = tl.load(delta_ptr + bn * T + qq, mask=qq < T, other=0.0)
      s = tl.dot(q, tl.trans(k)) * scale
      valid = _visible(qq, offs_k, T, S, LEFT, RIGHT, CAUSAL, WINDOW)
      p = tl.where(valid, tl.exp(s - lse[:, None]), 0.0)
      dv += tl.dot(tl.trans(p.to(do.dtype)), do)
      dp = tl.dot(do, tl.trans(v))
      ds = p * (dp - delta[:, None])
      dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dkv_row = bn * S * H + offs_k[:, None] * H + offs_h[None, :]
    tl.store(dk_ptr + dkv_row, dk * scale, mask=kmask)
    tl.store(dv_ptr + dkv_row, dv, mask=kmask)

  _KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkv": _dkv_kernel}
else:
  _KERNELS = {}


# --------------------------------------------------------------------------
# Launch configuration.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile sizes and compiler options of one kernel launch.

  block_q / block_kv: query / key tile (powers of two >= 16; tl.dot needs
  16). num_warps / num_stages: Triton compiler options (software-pipelining
  depth of the tile loop).
  """
  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class TritonFlashConfig:
  """Per-kernel launch configs: forward, dQ, dK/dV."""
  fwd: KernelConfig
  dq: KernelConfig
  dkv: KernelConfig

  def replace_all(self, **kw) -> "TritonFlashConfig":
    """The same config with fields of all three kernels overridden."""
    kw = {k: v for k, v in kw.items() if v is not None}
    return TritonFlashConfig(*(dataclasses.replace(c, **kw)
                               for c in (self.fwd, self.dq, self.dkv)))


# (fwd, dq, dkv) as (block_q, block_kv, num_warps, num_stages), keyed by
# (largest head dim served, 16-bit inputs?). Chosen by compiling for sm_90 and
# sm_80 on CPU: every entry fits both devices' shared memory (asserted by
# tests/test_triton.py), and per `cuobjdump --dump-resource-usage` the 16-bit
# entries have no stack frame (no register spills) for sm_90; for sm_80 a few
# spill 8-64 bytes, and float32 entries spill up to 40 (sm_90) / 144 (sm_80)
# bytes. NOT timed on a GPU.
_DEFAULTS = {
    (64, True): ((128, 64, 4, 3), (128, 64, 8, 3), (32, 128, 8, 3)),
    (128, True): ((128, 64, 8, 3), (128, 64, 8, 2), (32, 64, 8, 3)),
    (256, True): ((64, 64, 8, 2), (64, 32, 8, 2), (16, 64, 8, 2)),
    (64, False): ((128, 32, 8, 3), (128, 64, 8, 3), (32, 128, 8, 3)),
    (128, False): ((128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 8, 2)),
    (256, False): ((32, 32, 4, 2), (32, 32, 8, 1), (16, 32, 8, 2)),
}


def default_config(head_dim: int, dtype=jnp.bfloat16) -> TritonFlashConfig:
  """Default launch configs for Hopper (H100/H200), by head dim and dtype.

  The usual Triton flash shapes: 128-row query tiles in the forward and dQ
  kernels with 64-key partner tiles, 128-key tiles in dK/dV up to head dim
  64, 8 warps beyond head dim 64, 3 pipeline stages where shared memory
  allows and 2 (or 1) where it does not; smaller tiles at head dim 256 and
  for float32 (whose tiles are twice as big). Each compiles for sm_90 and
  sm_80 and fits their shared memory (tests/test_triton.py checks this on
  CPU). They have NOT been timed on a GPU: treat them as a starting point
  and pass a `TritonFlashConfig` from a benchmark sweep to do better.
  """
  if head_dim > 256:
    raise NotImplementedError(f"head_dim {head_dim} > 256")
  bound = 64 if head_dim <= 64 else (128 if head_dim <= 128 else 256)
  fwd, dq, dkv = _DEFAULTS[(bound, jnp.dtype(dtype).itemsize <= 2)]
  return TritonFlashConfig(KernelConfig(*fwd), KernelConfig(*dq),
                           KernelConfig(*dkv))


def _check_config(cfg: TritonFlashConfig):
  for name in ("fwd", "dq", "dkv"):
    c = getattr(cfg, name)
    for field in ("block_q", "block_kv"):
      x = getattr(c, field)
      if not isinstance(x, int) or x < 16 or x & (x - 1):
        raise ValueError(f"config.{name}.{field} must be a power of two >= "
                         f"16, got {x!r}.")
    if not isinstance(c.num_warps, int) or c.num_warps < 1 or (
        c.num_warps & (c.num_warps - 1)):
      raise ValueError(f"config.{name}.num_warps must be a power of two, got "
                       f"{c.num_warps!r}.")
    if not isinstance(c.num_stages, int) or c.num_stages < 1:
      raise ValueError(f"config.{name}.num_stages must be >= 1, got "
                       f"{c.num_stages!r}.")


class _Launch(NamedTuple):
  """Everything one kernel launch needs besides its input arrays."""
  name: str                # "fwd" | "dq" | "dkv"
  kernel: Any              # the @triton.jit function
  grid: tuple[int, ...]
  in_types: tuple          # ShapeDtypeStructs of the input arrays, in order
  scalars: tuple           # runtime scalars after the inputs:
                           # (T, S, scale, LEFT, RIGHT)
  out_types: tuple         # ShapeDtypeStructs of the outputs, in order
  meta: tuple              # constexprs as sorted (name, value) pairs
  num_warps: int
  num_stages: int


class _Static(NamedTuple):
  """Hashable launch parameters shared by forward and backward."""
  scale: float
  causal: bool
  config: TritonFlashConfig
  interpret: bool
  window: Optional[tuple] = None    # (left, right) or None


def _sds(x):
  return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype))


def _launch(name, st: _Static, kcfg: KernelConfig, q, k, inputs, outs, grid):
  b, n, t, h = q.shape
  nkv, s = k.shape[1], k.shape[2]
  meta = dict(N=n, G=n // nkv, H=h, BQ=kcfg.block_q, BK=kcfg.block_kv,
              CAUSAL=st.causal, WINDOW=st.window is not None)
  left, right = st.window or (0, 0)
  return _Launch(name, _KERNELS[name], grid, tuple(_sds(x) for x in inputs),
                 (int(t), int(s), float(st.scale), int(left), int(right)),
                 tuple(outs),
                 tuple(sorted(meta.items())), kcfg.num_warps, kcfg.num_stages)


def _fwd_launch(st: _Static, q, k, v) -> _Launch:
  """q [B, N, T, H], k/v [B, K, S, H] (anything with .shape/.dtype)."""
  b, n, t, _ = q.shape
  c = st.config.fwd
  outs = (_sds(q), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
  return _launch("fwd", st, c, q, k, (q, k, v), outs,
                 (cdiv(t, c.block_q), b * n))


def _dq_launch(st: _Static, q, k, v, do, lse, delta) -> _Launch:
  b, n, t, _ = q.shape
  c = st.config.dq
  return _launch("dq", st, c, q, k, (q, k, v, do, lse, delta), (_sds(q),),
                 (cdiv(t, c.block_q), b * n))


def _dkv_launch(st: _Static, q, k, v, do, lse, delta) -> _Launch:
  b, n, _, h = q.shape
  s = k.shape[2]
  c = st.config.dkv
  per_head = jax.ShapeDtypeStruct((b, n, s, h), jnp.float32)
  return _launch("dkv", st, c, q, k, (q, k, v, do, lse, delta),
                 (per_head, per_head), (cdiv(s, c.block_kv), b * n))


# --------------------------------------------------------------------------
# Back ends: jax_triton (GPU) and Triton's interpreter (CPU).
# --------------------------------------------------------------------------

def _jax_triton_launch(launch: _Launch, *arrays):
  jt, err = _import_jax_triton()
  if err is not None:
    raise NotImplementedError(err)
  params = inspect.signature(jt.triton_call).parameters
  out_kw = "out_type" if "out_type" in params else "out_shape"  # 0.4 renamed it
  outs = jt.triton_call(
      *arrays, *launch.scalars, kernel=launch.kernel,
      **{out_kw: list(launch.out_types)}, grid=launch.grid,
      num_warps=launch.num_warps, num_stages=launch.num_stages,
      **dict(launch.meta))
  return tuple(outs)


class _HostTensor:
  """The slice of `torch.Tensor` that Triton's interpreter launcher uses.

  Backed by a C-contiguous numpy array in host memory, which for the
  interpreter *is* device memory: data_ptr is the buffer address, the
  "storage" is the tensor itself, and the host<->device copies the launcher
  makes (`.cpu()`, `new_empty().set_()`, `copy_`) are the identity.
  `dtype` is a numpy dtype: `triton.runtime.jit.mangle_type` parses
  str(dtype) ('float32', 'float16', 'bfloat16' from ml_dtypes) into
  '*fp32' / '*fp16' / '*bf16' and caches the result by type(dtype), which is
  distinct for every numpy dtype.
  """

  def __init__(self, array: np.ndarray):
    if not array.flags.c_contiguous:
      raise ValueError("_HostTensor needs a C-contiguous array")
    self.array = array
    self.dtype = array.dtype

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def untyped_storage(self):
    return self

  def cpu(self):
    return self

  def new_empty(self, *shape, **kwargs):
    del shape, kwargs
    return self

  def set_(self, storage, offset, size, stride):
    assert storage is self and offset == 0, "views are not supported"
    return self

  def storage_offset(self) -> int:
    return 0

  def size(self):
    return self.array.shape

  def stride(self):
    return tuple(st // self.array.itemsize for st in self.array.strides)

  def copy_(self, other):
    assert other is self
    return self


_INTERP_LOCK = threading.Lock()  # the interpreter's builder is global state


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
  from triton.runtime.interpreter import InterpretedFunction
  return InterpretedFunction(fn)


class _InterpreterScope:
  """Scoped patches of Triton's (global) interpreter state for one launch.

  Triton's interpreter is meant to be switched on by TRITON_INTERPRET=1
  before `triton` is imported, which makes every `@triton.jit` an
  InterpretedFunction. Here `triton` is imported normally (the same kernels
  also go to jax_triton / triton.compile), so for the duration of a launch:
  * `JITFunction.__call__` runs the function interpreted: the kernels call
    @triton.jit functions of triton.language (tl.zeros, tl.max, tl.sum),
    which otherwise refuse to run outside a compiled kernel; the language
    patches this needs are undone after each such call;
  * every masked load/store is bounds-checked: each address whose mask is
    set must lie inside one of the launch's buffers (stores: outputs only).
    On a GPU an out-of-bounds access is silent corruption or a fault; in the
    interpreter it would read or write arbitrary host memory.
  * `tl.dot` on bfloat16: Triton 3.9's interpreter keeps bfloat16 tensors as
    raw uint16 bits and hands those to np.matmul, i.e. multiplies the bit
    patterns as integers. Operands are converted to float32 first (exact),
    which is what the tensor cores compute before float32 accumulation.
  """

  def __init__(self, readable, writable):
    self.readable = readable    # [(lo, hi)] byte ranges
    self.writable = writable

  def _check(self, ptrs, mask, nbytes, ranges, what):
    addr = np.asarray(ptrs.data, np.uint64)
    m = np.broadcast_to(np.asarray(mask.data, bool), addr.shape)
    a = addr[m]
    ok = np.zeros(a.shape, bool)
    for lo, hi in ranges:
      ok |= (a >= lo) & (a + np.uint64(nbytes) <= hi)
    if not ok.all():
      bad = int(a[~ok][0])
      raise IndexError(
          f"out-of-bounds {what}: {int((~ok).sum())} addresses outside the "
          f"launch's buffers (first 0x{bad:x}; buffers "
          f"{[(hex(lo), hex(hi)) for lo, hi in ranges]})")

  def __enter__(self):
    from triton.runtime import interpreter as ti
    b = ti.interpreter_builder
    orig_load, orig_store = b.create_masked_load, b.create_masked_store
    orig_dot = b.create_dot
    nbytes = lambda p: p.get_element_ty().primitive_bitwidth // 8

    def load(ptrs, mask, other, *rest):
      self._check(ptrs, mask, nbytes(ptrs), self.readable, "load")
      return orig_load(ptrs, mask, other, *rest)

    def store(ptrs, value, mask, *rest):
      self._check(ptrs, mask, nbytes(ptrs), self.writable, "store")
      return orig_store(ptrs, value, mask, *rest)

    def as_f32(x):
      if x.dtype == tl.bfloat16:
        import ml_dtypes
        return ti.TensorHandle(
            x.data.view(ml_dtypes.bfloat16).astype(np.float32), tl.float32)
      return x

    def dot(a, bb, d, *rest):
      return orig_dot(as_f32(a), as_f32(bb), d, *rest)

    from triton.runtime.jit import JITFunction
    self._builder = b
    self._jit_call = JITFunction.__dict__["__call__"]
    b.create_masked_load, b.create_masked_store = load, store
    b.create_dot = dot

    def call_jit(f, *args, **kwargs):
      # InterpretedFunction.__call__ would patch triton.language.core (the
      # stdlib's namespace) and never restore it, which breaks any later
      # triton.compile in this process: patch for this call only.
      scope = ti._patch_lang(f.fn)
      try:
        return _interpreted(f.fn).rewrite()(*args, **kwargs)
      finally:
        scope.restore()

    JITFunction.__call__ = call_jit
    return self

  def __exit__(self, *exc):
    from triton.runtime.jit import JITFunction
    JITFunction.__call__ = self._jit_call
    for attr in ("create_masked_load", "create_masked_store", "create_dot"):
      self._builder.__dict__.pop(attr, None)
    return False


def _interpret_host(launch: _Launch, *arrays):
  """Runs one launch in Triton's interpreter on numpy arrays; returns outs."""
  ins = [np.ascontiguousarray(np.asarray(a)) for a in arrays]
  for x, want in zip(ins, launch.in_types):
    assert x.shape == want.shape and x.dtype == want.dtype, (x, want)
  # Outputs start as NaN, so an element the kernel never stores shows up
  # (device memory is not zeroed either).
  outs = [np.full(o.shape, np.nan, o.dtype) for o in launch.out_types]
  span = lambda x: (x.ctypes.data, x.ctypes.data + x.nbytes)
  with _INTERP_LOCK, _InterpreterScope([span(x) for x in ins + outs],
                                         [span(x) for x in outs]):
    _interpreted(launch.kernel.fn)[launch.grid](
        *map(_HostTensor, ins), *launch.scalars, *map(_HostTensor, outs),
        **dict(launch.meta))
  return tuple(outs)


def _interpret_launch(launch: _Launch, *arrays):
  return tuple(jax.pure_callback(
      functools.partial(_interpret_host, launch), tuple(launch.out_types),
      *arrays, vmap_method="sequential"))


def _run(st: _Static, launch: _Launch, *arrays):
  return (_interpret_launch if st.interpret else _jax_triton_launch)(
      launch, *arrays)


# --------------------------------------------------------------------------
# custom_vjp glue (shared by both back ends).
# --------------------------------------------------------------------------

def _fwd(st: _Static, q, k, v):
  return _run(st, _fwd_launch(st, q, k, v), q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tri(st, q, k, v):
  return _fwd(st, q, k, v)


def _tri_fwd(st, q, k, v):
  out, lse = _fwd(st, q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _tri_bwd(st, res, cts):
  q, k, v, out, lse = res
  dout, dlse = cts
  b, n, _, h = q.shape
  nkv, s = k.shape[1], k.shape[2]
  g = n // nkv
  # dS = P * (dP - delta) with delta = rowsum(dO * O) - dlse: the lse
  # cotangent enters as + P * dlse.
  delta = jnp.einsum("bnth,bnth->bnt", dout.astype(jnp.float32),
                     out.astype(jnp.float32))
  if dlse is not None:
    delta = delta - dlse.astype(jnp.float32)
  dout = dout.astype(q.dtype)
  args = (q, k, v, dout, lse, delta)
  (dq,) = _run(st, _dq_launch(st, *args), *args)
  dk, dv = _run(st, _dkv_launch(st, *args), *args)
  dk = dk.reshape(b, nkv, g, s, h).sum(2).astype(k.dtype)
  dv = dv.reshape(b, nkv, g, s, h).sum(2).astype(v.dtype)
  return dq, dk, dv


_tri.defvjp(_tri_fwd, _tri_bwd)


_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16),
           jnp.dtype(jnp.float32))


def _check_inputs(query, key, value):
  """Shape/dtype checks shared by the public entry points: the layout rule
  (`_rules.check_qkv`, value head_dim equal to head_dim) as ValueError, then
  what the Triton kernels cannot serve as NotImplementedError."""
  b, t, n, s, nkv, h, hv = check_qkv(query, key, value, allow_unbatched=False,
                                     same_value_dim=True)
  if h < 16 or h > 256 or h & (h - 1):
    raise NotImplementedError(
        f"Triton flash attention needs a power-of-two head_dim in [16, 256], "
        f"got {h}.")
  if b * n > 65535:
    raise NotImplementedError(
        f"batch * heads = {b * n} exceeds the CUDA grid's second dimension "
        "(65535).")
  dts = {jnp.dtype(x.dtype) for x in (query, key, value)}
  if len(dts) != 1 or dts.pop() not in _DTYPES:
    raise NotImplementedError(
        "Triton flash attention needs query/key/value of one dtype among "
        f"float16/bfloat16/float32, got {query.dtype}, {key.dtype}, "
        f"{value.dtype}.")


def _window(local_window_size):
  """None, int w or (left, right) -> None or (left, right) of ints >= 0,
  capped at 2**30 (the kernels take them as int32 scalars)."""
  w = normalize_window(local_window_size)
  return None if w is None else (min(w[0], 2 ** 30), min(w[1], 2 ** 30))


def _resolve_config(h, dtype, config, block_q, block_kv, num_warps,
                    num_stages) -> TritonFlashConfig:
  cfg = default_config(h, dtype) if config is None else config
  cfg = cfg.replace_all(block_q=block_q, block_kv=block_kv,
                        num_warps=num_warps, num_stages=num_stages)
  _check_config(cfg)
  return cfg


def triton_flash_attention(query, key, value, *, is_causal: bool = False,
                           scale: Optional[float] = None,
                           config: Optional[TritonFlashConfig] = None,
                           block_q: Optional[int] = None,
                           block_kv: Optional[int] = None,
                           num_warps: Optional[int] = None,
                           num_stages: Optional[int] = None,
                           return_lse: bool = False, interpret: bool = False,
                           local_window_size=None):
  """Flash attention via jax_triton.triton_call (GPU only), differentiable.

  query [B, T, N, H], key/value [B, S, K, H], N % K == 0, H a power of two
  in [16, 256], value head dim == H, one dtype among f16/bf16/f32. Returns
  the output [B, T, N, H] (and lse [B, N, T], float32, with return_lse).

  config: per-kernel tiles/warps/stages (default `default_config(H, dtype)`);
  block_q / block_kv / num_warps / num_stages, when given, override that
  field of all three kernels (for quick benchmark sweeps).
  local_window_size: int w or (left, right): query i sees keys
  i - left .. i + right (with is_causal also j <= i); tiles outside the band
  are skipped in all three kernels.
  interpret=True runs the same launches in Triton's CPU interpreter through
  `jax.pure_callback` instead of jax_triton (needs only `triton`; very slow;
  for testing). Not vmappable on a GPU (jax_triton has no batching rule).

  Raises NotImplementedError where Triton cannot run or cannot serve the
  call, ValueError for bad shapes or configs.
  """
  if interpret:
    if _TRITON_IMPORT_ERROR is not None:
      raise NotImplementedError(
          f"interpret=True needs triton ({_TRITON_IMPORT_ERROR})")
  else:
    why = why_unavailable()
    if why is not None:
      raise NotImplementedError(why)
  _check_inputs(query, key, value)
  h = query.shape[-1]
  cfg = _resolve_config(h, query.dtype, config, block_q, block_kv, num_warps,
                        num_stages)
  scale = default_scale(scale, h)
  st = _Static(scale, bool(is_causal), cfg, bool(interpret),
               _window(local_window_size))
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  out, lse = _tri(st, q, k, v)
  out = jnp.swapaxes(out, 1, 2)
  return (out, lse) if return_lse else out


# --------------------------------------------------------------------------
# Ahead-of-time compilation for a CUDA target (works without a GPU).
# --------------------------------------------------------------------------

_TRITON_DTYPE = {jnp.dtype(jnp.float16): "fp16",
                 jnp.dtype(jnp.bfloat16): "bf16",
                 jnp.dtype(jnp.float32): "fp32"}


def _scalar_type(x) -> str:
  # As jax_triton 0.4 `get_type_id`: Python int -> i32 (in range), float ->
  # fp32 (when representable).
  if isinstance(x, bool):
    raise TypeError("no bool runtime scalars here")
  if isinstance(x, int):
    if not -2**31 <= x < 2**31:
      raise ValueError(f"scalar {x} does not fit in i32")
    return "i32"
  if isinstance(x, float):
    return "fp32"
  raise TypeError(f"unexpected scalar {x!r}")


def _compile_source(launch: _Launch):
  """(ASTSource, options) as jax_triton 0.4 would build them for a launch.

  Pointers get `tt.divisibility` 16 (jax_triton assumes 16-byte aligned
  buffers); runtime int scalars equal to 1 become the constexpr 1 (as
  jax_triton's `equal_to_1` specialization does); other scalars keep their
  runtime type with no divisibility attribute.
  """
  from triton.compiler import ASTSource
  fn = launch.kernel
  names = fn.arg_names
  meta = dict(launch.meta)
  runtime = ([("*" + _TRITON_DTYPE[t.dtype], None) for t in launch.in_types]
             + [(_scalar_type(x), x) for x in launch.scalars]
             + [("*" + _TRITON_DTYPE[t.dtype], None)
                for t in launch.out_types])
  assert len(runtime) + len(meta) == len(names), (names, runtime, meta)
  signature, constexprs, attrs = {}, dict(meta), {}
  for i, (name, (ty, value)) in enumerate(zip(names, runtime)):
    if ty.startswith("*"):
      signature[name] = ty
      attrs[(i,)] = [["tt.divisibility", 16]]
    elif ty == "i32" and value == 1:
      signature[name] = "constexpr"
      constexprs[name] = 1
    else:
      signature[name] = ty
  for name in meta:
    signature[name] = "constexpr"
  return ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                   attrs=attrs), dict(num_warps=launch.num_warps,
                                      num_stages=launch.num_stages)


def compile_for_cuda(query_shape, key_shape, dtype, *, is_causal: bool,
                     capability: int = 90,
                     config: Optional[TritonFlashConfig] = None,
                     scale: Optional[float] = None,
                     local_window_size=None) -> dict[str, Any]:
  """Compiles the three kernels for `sm_<capability>` without a GPU.

  query_shape [B, T, N, H], key_shape [B, S, K, H]. Uses the launches
  `triton_flash_attention` would make (same grid/scalars/constexprs/
  warps/stages) and the signature jax_triton 0.4 would pass. Returns
  {"fwd" | "dq" | "dkv": triton CompiledKernel}; `.metadata.shared` is the
  shared memory per block in bytes, `.asm` holds ttir/ttgir/llir/ptx/cubin.
  Needs only the `triton` wheel (its bundled ptxas).
  """
  if _TRITON_IMPORT_ERROR is not None:
    raise NotImplementedError(f"needs triton ({_TRITON_IMPORT_ERROR})")
  from triton.backends.compiler import GPUTarget
  b, t, n, h = query_shape
  s, nkv = key_shape[1], key_shape[2]
  q = jax.ShapeDtypeStruct((b, n, t, h), jnp.dtype(dtype))
  k = jax.ShapeDtypeStruct((b, nkv, s, h), jnp.dtype(dtype))
  _check_inputs(jax.ShapeDtypeStruct(tuple(query_shape), q.dtype),
                jax.ShapeDtypeStruct(tuple(key_shape), q.dtype),
                jax.ShapeDtypeStruct(tuple(key_shape), q.dtype))
  cfg = _resolve_config(h, q.dtype, config, None, None, None, None)
  scale = default_scale(scale, h)
  st = _Static(scale, bool(is_causal), cfg, False,
               _window(local_window_size))
  vec = jax.ShapeDtypeStruct((b, n, t), jnp.float32)
  launches = [_fwd_launch(st, q, k, k), _dq_launch(st, q, k, k, q, vec, vec),
              _dkv_launch(st, q, k, k, q, vec, vec)]
  target = GPUTarget("cuda", int(capability), 32)
  out = {}
  for launch in launches:
    src, options = _compile_source(launch)
    out[launch.name] = triton.compile(src, target=target, options=options)
  return out
