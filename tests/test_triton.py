"""Triton flash attention (pallas_kernels/triton_flash.py).

Three layers of checks:
* CPU, needs only the `triton` package (skipped cleanly without it):
  - the kernels run in Triton's interpreter (`interpret=True`: the same
    launches and custom_vjp glue as the jax_triton path, through
    jax.pure_callback) and are compared with `flash.mha_reference` and
    jax.grad of it;
  - the kernels compile for sm_90 / sm_80 and fit the shared memory.
* GPU, needs jax_triton and a GPU: the real thing (skipped elsewhere).
"""

import inspect
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import attnjax
from pallas_kernels import flash as fa
from pallas_kernels import triton_flash as tf
from tests.conftest import gpu_available


@pytest.fixture
def triton_pkg():
  return pytest.importorskip("triton")


def test_guarded_import_and_refusal_everywhere():
  # Importing never fails; where Triton cannot run, calls refuse clearly.
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  if not tf.triton_available():
    assert tf.why_unavailable()
    with pytest.raises(NotImplementedError):
      tf.triton_flash_attention(q, q, q)
    with pytest.raises(NotImplementedError, match="triton"):
      attnjax.dot_product_attention(q, q, q, implementation="triton")
  # Calls the Triton backend never serves are refused on every platform.
  with pytest.raises(NotImplementedError):
    attnjax.dot_product_attention(q, q, q, bias=jnp.zeros((8, 8)),
                                  implementation="triton")


# ---------------------------------------------------------------------------
# Interpreter: values, lse and gradients vs the plain-jnp reference.
# ---------------------------------------------------------------------------

def _f32(x):
  return x.astype(jnp.float32)


def _outputs_and_grads(fn, q, k, v, dout, dlse):
  """(out, lse, dq, dk, dv) of loss = <out, dout> + <lse, dlse>."""
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    return jnp.sum(_f32(out) * dout) + jnp.sum(lse * dlse), (out, lse)
  (dq, dk, dv), (out, lse) = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  return [_f32(x) for x in (out, lse, dq, dk, dv)]


# Interpreter float32 math is exact float32 (the GPU would use TF32), so the
# float32 tolerance is tight. bfloat16: P and dS are cast to bfloat16 before
# their dots (truncated by the interpreter, rounded on a GPU) and the output
# is stored in bfloat16; the reference works in float32 on the same
# bfloat16-valued inputs. test_tolerances_reject_wrong_results shows these
# bounds reject an off-by-one causal mask and a dropped lse cotangent.
_TOL = {jnp.float32: dict(out=2e-5, lse=2e-5, grad=2e-5),
        jnp.bfloat16: dict(out=2e-2, lse=2e-5, grad=2e-2)}


def _assert_matches(got, ref, dtype):
  tol = _TOL[dtype]
  names = ("out", "lse", "dq", "dk", "dv")
  for name, a, r in zip(names, got, ref):
    assert a.shape == r.shape, (name, a.shape, r.shape)
    assert np.isfinite(a).all(), name
    if name == "lse":   # exact in both dtypes: float32 math on exact inputs
      np.testing.assert_allclose(a, r, atol=tol["lse"], rtol=tol["lse"],
                                 err_msg=name)
    elif name == "out":
      np.testing.assert_allclose(a, r, atol=tol["out"], rtol=tol["out"],
                                 err_msg=name)
    else:  # gradients: error relative to the gradient's largest entry
      err = np.abs(a - r).max() / np.abs(r).max()
      assert err < tol["grad"], (name, err)


def _case(rng, b, t, s, n, kh, h, dtype):
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  dout = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  dlse = jnp.asarray(rng.standard_normal((b, n, t)), jnp.float32)
  return q, k, v, dout, dlse


def _reference(q, k, v, dout, dlse, is_causal, **kw):
  ref = lambda q, k, v: fa.mha_reference(q, k, v, is_causal=is_causal,
                                         return_lse=True, **kw)
  got = _outputs_and_grads(ref, _f32(q), _f32(k), _f32(v), dout, dlse)
  return [np.asarray(x) for x in got]


def _interpreted(q, k, v, dout, dlse, is_causal, **kw):
  kern = lambda q, k, v: tf.triton_flash_attention(
      q, k, v, is_causal=is_causal, return_lse=True, interpret=True, **kw)
  got = jax.jit(lambda *a: _outputs_and_grads(kern, *a))(q, k, v, dout, dlse)
  return [np.asarray(x) for x in got]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_interpreter_values_and_grads_vs_reference(triton_pkg, dtype,
                                                   is_causal):
  # GQA (4 query heads on 2 kv heads); lengths the tiles do not divide;
  # T != S when not causal.
  rng = np.random.default_rng(0)
  t, s = (200, 200) if is_causal else (100, 333)
  args = _case(rng, 1, t, s, 4, 2, 32, dtype)
  got = _interpreted(*args, is_causal, block_q=64, block_kv=32)
  _assert_matches(got, _reference(*args, is_causal), dtype)


@pytest.mark.parametrize(
    "h,t,s,n,kh,is_causal,cfg",
    [(16, 70, 45, 2, 2, True, dict(block_q=32, block_kv=16)),   # T > S causal
     (16, 40, 90, 2, 1, True, dict(block_q=16, block_kv=32)),   # T < S causal
     (64, 40, 72, 4, 1, False, dict(block_q=16, block_kv=16))])  # MQA
def test_interpreter_head_dims_and_shapes(triton_pkg, h, t, s, n, kh,
                                          is_causal, cfg):
  rng = np.random.default_rng(1)
  args = _case(rng, 2, t, s, n, kh, h, jnp.float32)
  got = _interpreted(*args, is_causal, **cfg)
  _assert_matches(got, _reference(*args, is_causal), jnp.float32)


@pytest.mark.parametrize(
    "t,s,window,is_causal",
    [(150, 150, (40, 7), False),     # asymmetric band, ragged tails
     (150, 150, (33, 0), True),      # causal sliding window (Mistral-style)
     (60, 130, (20, 50), False)])    # T != S
def test_interpreter_local_window(triton_pkg, t, s, window, is_causal):
  rng = np.random.default_rng(4)
  args = _case(rng, 1, t, s, 4, 2, 16, jnp.float32)
  got = _interpreted(*args, is_causal, block_q=32, block_kv=16,
                     local_window_size=window)
  _assert_matches(got, _reference(*args, is_causal, local_window_size=window),
                  jnp.float32)


def test_interpreter_default_config(triton_pkg):
  # The launch a GPU would get by default (head dim 64: 128-row tiles, ...).
  rng = np.random.default_rng(2)
  args = _case(rng, 1, 130, 130, 2, 1, 64, jnp.bfloat16)
  got = _interpreted(*args, True)
  _assert_matches(got, _reference(*args, True), jnp.bfloat16)
  cfg = tf.default_config(64, jnp.bfloat16)
  assert (cfg.fwd.block_q, cfg.dkv.block_kv) == (128, 128)


def test_interpreter_custom_scale_and_plain_output(triton_pkg):
  rng = np.random.default_rng(3)
  q, k, v, _, _ = _case(rng, 1, 33, 47, 2, 2, 32, jnp.float32)
  got = tf.triton_flash_attention(q, k, v, scale=0.3, block_q=16,
                                  block_kv=16, interpret=True)
  ref = fa.mha_reference(q, k, v, scale=0.3)
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tolerances_reject_wrong_results(dtype):
  # The bounds used above are tight enough to catch realistic kernel bugs:
  # a causal mask off by one key, and a backward that ignores dlse.
  rng = np.random.default_rng(0)
  args = _case(rng, 1, 64, 64, 2, 1, 32, dtype)
  ref = _reference(*args, True)
  t = args[0].shape[1]
  shifted = jnp.tril(jnp.ones((t, t), bool), 1)   # sees one key too many
  wrong_mask = _reference(*args, False, mask=shifted)
  with pytest.raises(AssertionError):
    _assert_matches(wrong_mask, ref, dtype)
  no_dlse = _reference(*args[:4], jnp.zeros_like(args[4]), True)
  with pytest.raises(AssertionError):
    _assert_matches(no_dlse, ref, dtype)
  _assert_matches(ref, ref, dtype)


# ---------------------------------------------------------------------------
# The interpreter shims themselves.
# ---------------------------------------------------------------------------

def _copy_kernel():
  import triton
  import triton.language as tl

  @triton.jit
  def copy(x_ptr, n, y_ptr, B: tl.constexpr, MASKED: tl.constexpr):
    r = tl.arange(0, B)
    if MASKED:
      tl.store(y_ptr + r, tl.load(x_ptr + r, mask=r < n), mask=r < n)
    else:
      tl.store(y_ptr + r, tl.load(x_ptr + r))
  return copy


def _launch(kernel, ins, scalars, outs, **meta):
  sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  return tf._Launch("test", kernel, (1,), tuple(map(sds, ins)), scalars,
                    tuple(map(sds, outs)), tuple(sorted(meta.items())), 4, 1)


def test_interpreter_bounds_check(triton_pkg):
  from triton.runtime.interpreter import InterpreterError
  copy = _copy_kernel()
  x = np.arange(10, dtype=np.float32)
  y = np.zeros(10, np.float32)
  (got,) = tf._interpret_host(_launch(copy, [x], (10,), [y], B=16,
                                      MASKED=True), x)
  np.testing.assert_array_equal(got, x)
  with pytest.raises(InterpreterError, match="out-of-bounds load"):
    tf._interpret_host(_launch(copy, [x], (10,), [y], B=16, MASKED=False), x)


def test_interpreter_leaves_triton_unpatched(triton_pkg):
  # The interpreter patches triton.language while it runs; compiling kernels
  # later in the same process needs every patch undone.
  import triton.language as tl
  from triton.runtime.jit import JITFunction
  watched = (tl, tl.core, tl.math, tl.tensor, tl.dtype, JITFunction)
  before = [dict(vars(m)) for m in watched]
  q = jnp.ones((1, 20, 1, 16), jnp.float32)
  tf.triton_flash_attention(q, q, q, block_q=16, block_kv=16, interpret=True)
  for m, was in zip(watched, before):
    now = dict(vars(m))
    changed = sorted(k for k in set(was) | set(now)
                     if was.get(k, None) is not now.get(k, None))
    assert not changed, (m, changed)


def test_interpreter_bf16_dot(triton_pkg):
  import triton
  import triton.language as tl

  @triton.jit
  def matmul(a_ptr, b_ptr, c_ptr, M: tl.constexpr):
    r = tl.arange(0, M)
    idx = r[:, None] * M + r[None, :]
    tl.store(c_ptr + idx, tl.dot(tl.load(a_ptr + idx), tl.load(b_ptr + idx)))

  rng = np.random.default_rng(0)
  a, b = (rng.standard_normal((16, 16)).astype(ml_dtypes.bfloat16)
          for _ in range(2))
  c = np.zeros((16, 16), np.float32)
  (got,) = tf._interpret_host(_launch(matmul, [a, b], (), [c], M=16), a, b)
  want = a.astype(np.float32) @ b.astype(np.float32)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_kernel_parameter_order_matches_jax_triton_binding(triton_pkg):
  # jax_triton binds the positional args (input arrays, then the runtime
  # scalars) to the first kernel parameters and passes the outputs to the
  # remaining non-constexpr ones (0.4+; older versions appended the output
  # pointers after all args, which is the same order).
  st = tf._Static(0.5, True, tf.default_config(32), False)
  q = jax.ShapeDtypeStruct((1, 4, 20, 32), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 2, 30, 32), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((1, 4, 20), jnp.float32)
  for launch in (tf._fwd_launch(st, q, k, k),
                 tf._dq_launch(st, q, k, k, q, vec, vec),
                 tf._dkv_launch(st, q, k, k, q, vec, vec)):
    params = list(inspect.signature(launch.kernel.fn).parameters)
    nin, nout = len(launch.in_types), len(launch.out_types)
    meta = dict(launch.meta)
    assert params[nin:nin + 5] == ["T", "S", "scale", "LEFT", "RIGHT"]
    assert launch.scalars == (20, 30, 0.5, 0, 0)
    assert all(p.endswith("_ptr") for p in params[:nin])
    assert all(p.endswith("_ptr") for p in params[nin + 5:nin + 5 + nout])
    assert params[nin + 5 + nout:] == sorted(meta, key=params.index)
    assert len(params) == nin + 5 + nout + len(meta)


def test_config_and_input_errors(triton_pkg):
  q = jnp.zeros((1, 8, 2, 16), jnp.float32)
  run = lambda *a, **kw: tf.triton_flash_attention(*a, interpret=True, **kw)
  with pytest.raises(ValueError, match="block_q"):
    run(q, q, q, block_q=24)
  with pytest.raises(ValueError, match="num_warps"):
    run(q, q, q, num_warps=3)
  with pytest.raises(ValueError, match="key"):
    run(q, q[:, :, :1, :8], q[:, :, :1, :8])
  with pytest.raises(NotImplementedError, match="head_dim"):
    run(q[..., :12], q[..., :12], q[..., :12])
  with pytest.raises(NotImplementedError, match="dtype"):
    run(q, q.astype(jnp.bfloat16), q)


# ---------------------------------------------------------------------------
# Compilation for the real targets (no GPU needed).
# ---------------------------------------------------------------------------

_SHARED_LIMIT = {90: 232448, 80: 166912}   # bytes per block: H100/H200, A100


def _compile_and_check(capability, h, dtype, is_causal, window=None):
  kernels = tf.compile_for_cuda((2, 1000, 8, h), (2, 1000, 4, h), dtype,
                                is_causal=is_causal, capability=capability,
                                local_window_size=window)
  assert set(kernels) == {"fwd", "dq", "dkv"}
  for name, kern in kernels.items():
    shared = kern.metadata.shared
    assert 0 < shared <= _SHARED_LIMIT[capability], (name, shared)
    assert f".target sm_{capability}" in kern.asm["ptx"]
    assert len(kern.asm["cubin"]) > 0
  return {n: k.metadata.shared for n, k in kernels.items()}


@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("h", [64, 128])
def test_compiles_for_cuda_and_fits_shared_memory(triton_pkg, capability, h):
  # ~0.6 s per kernel on a CPU (cached by Triton afterwards): bfloat16 here,
  # float16 (same tiles, same shared memory) in the slow test below.
  for is_causal in (False, True):
    _compile_and_check(capability, h, jnp.bfloat16, is_causal)
  _compile_and_check(capability, h, jnp.bfloat16, True, window=(256, 0))


@pytest.mark.slow
@pytest.mark.parametrize("capability", [90, 80])
def test_compiles_for_cuda_float16_other_head_dims_float32(triton_pkg,
                                                           capability):
  if os.environ.get("CI") and capability == 80:
    pytest.skip("reduced under CI: sm_90 only")
  for h in (64, 128):
    for is_causal in (False, True):
      _compile_and_check(capability, h, jnp.float16, is_causal)
  for h in (16, 32, 256):
    _compile_and_check(capability, h, jnp.bfloat16, False)
  for h in (64, 128, 256):
    _compile_and_check(capability, h, jnp.float32, False)


def test_shared_memory_check_can_fail(triton_pkg):
  # An oversized config compiles but does not fit: the limit assertion above
  # is a real check, not a formality.
  big = tf.KernelConfig(128, 128, 8, 4)
  cfg = tf.TritonFlashConfig(big, big, big)
  from triton.backends.compiler import GPUTarget
  st = tf._Static(0.1, False, cfg, False)
  q = jax.ShapeDtypeStruct((1, 2, 1000, 128), jnp.bfloat16)
  src, options = tf._compile_source(tf._fwd_launch(st, q, q, q))
  import triton
  kern = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=options)
  assert kern.metadata.shared > _SHARED_LIMIT[90]


# ---------------------------------------------------------------------------
# GPU (jax_triton).
# ---------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(
    not (gpu_available() and tf.triton_available()),
    reason="needs a GPU and jax_triton")


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
def test_values_and_grads_vs_reference(dtype, is_causal):
  rng = np.random.default_rng(0)
  b, t, s, n, kh, h = 2, 200, 200 if is_causal else 333, 4, 2, 64
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
  k = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  v = jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype)
  dout = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  kern = lambda q, k, v: tf.triton_flash_attention(q, k, v,
                                                   is_causal=is_causal)
  ref = lambda q, k, v: fa.mha_reference(q, k, v, is_causal=is_causal)
  f32 = lambda x: x.astype(jnp.float32)
  tol = 2e-3 if dtype == jnp.float32 else 3e-2   # TF32 dots on GPU
  np.testing.assert_allclose(np.asarray(jax.jit(kern)(q, k, v), np.float32),
                             ref(f32(q), f32(k), f32(v)), atol=tol, rtol=tol)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)
                                            * dout)
  g = jax.jit(jax.grad(loss(kern), (0, 1, 2)))(q, k, v)
  gr = jax.grad(loss(ref), (0, 1, 2))(f32(q), f32(k), f32(v))
  for a, r in zip(g, gr):
    err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(r)) / (
        np.linalg.norm(np.asarray(r)))
    assert err < 5e-2, err


def test_triton_config_reaches_the_kernel_through_dispatch(triton_pkg,
                                                           monkeypatch):
  """dot_product_attention(implementation=Triton(...)): the config's tiles
  and interpret flag reach triton_flash_attention (Triton's CPU interpreter
  here), and the result matches the XLA backend."""
  import attnjax
  from attnjax.softmax import Triton
  seen = []
  real = tf.triton_flash_attention
  monkeypatch.setattr(tf, "triton_flash_attention", lambda *a, **kw: (
      seen.append({k: kw[k] for k in ("block_q", "block_kv", "interpret")}),
      real(*a, **kw))[1])
  rng = np.random.default_rng(5)
  q, k, v, _, _ = _case(rng, 1, 33, 40, 2, 1, 16, jnp.float32)
  got = attnjax.dot_product_attention(
      q, k, v, is_causal=True,
      implementation=Triton(block_q=16, block_kv=32, interpret=True))
  assert seen == [{"block_q": 16, "block_kv": 32, "interpret": True}]
  ref = attnjax.dot_product_attention(q, k, v, is_causal=True,
                                      implementation="xla")
  np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)
