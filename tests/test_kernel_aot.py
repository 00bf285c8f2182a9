"""The Pallas kernels lower for TPU (Mosaic) and GPU (Triton IR) from a CPU.

`pallas_kernels.aot` traces and lowers with an abstract TPU/GPU device in
scope, which runs every Pallas lowering rule of the target backend without
the hardware. A kernel that uses an op the backend cannot lower, a block
shape it refuses (e.g. a non-power-of-two array on the Triton path), or
picks the wrong GPU backend fails here instead of on the accelerator.
(Device compilation of the lowered module still happens only on a device.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import aot
from pallas_kernels import block_sparse as bsp
from pallas_kernels import flash as fa
from pallas_kernels import linear_attention as la
from pallas_kernels import neighborhood as nb
from pallas_kernels._util import resolve_interpret, target_platform

S = jax.ShapeDtypeStruct
BF = jnp.bfloat16

_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
TARGETS = ["h100", "tpu_v5e"]


def _grad(f):
  return lambda *a: jax.grad(
      lambda *x: f(*x).astype(jnp.float32).sum(), (0, 1, 2))(*a)


def _qkv(shape, kv_shape=None, dtype=BF):
  kv = kv_shape or shape
  return S(shape, dtype), S(kv, dtype), S(kv, dtype)


CASES = {
    # name: (fn, args, number of kernels in fwd, in fwd+bwd)
    "flash": (lambda q, k, v: fa.flash_attention(q, k, v),
              _qkv((1, 1024, 4, 128)), 1, 3),
    "flash_causal_gqa_ragged": (
        lambda q, k, v: fa.flash_attention(q, k, v, is_causal=True),
        _qkv((2, 1000, 4, 64), (2, 1000, 2, 64)), 1, 3),
    "flash_window_seg_bias": (
        lambda q, k, v: fa.flash_attention(
            q, k, v, local_window_size=(200, 0),
            bias=jnp.zeros((4, 700, 700), jnp.float32),
            q_segment_ids=jnp.zeros((1, 700), jnp.int32),
            kv_segment_ids=jnp.zeros((1, 700), jnp.int32)),
        _qkv((1, 700, 4, 64)), 1, 3),
    "flash_hd80_t100_s3000": (   # head dim padded to 128 on the GPU path
        lambda q, k, v: fa.flash_attention(q, k, v),
        _qkv((1, 100, 2, 80), (1, 3000, 2, 80)), 1, 3),
    "flash_hd256_f32": (lambda q, k, v: fa.flash_attention(q, k, v),
                        _qkv((1, 512, 2, 256), dtype=jnp.float32), 1, 3),
    "block_sparse_per_head": (
        lambda q, k, v: bsp.block_sparse_attention(
            q, k, v, jnp.tile(jnp.tril(jnp.ones((8, 8), bool))[None],
                              (4, 1, 1)),
            block_q=128, block_kv=128, is_causal=True),
        _qkv((1, 1000, 4, 64)), 1, 3),
    "block_sparse_per_example": (
        lambda q, k, v: bsp.block_sparse_attention(
            q, k, v, jnp.ones((2, 4, 8, 8), bool).at[1, :, :, 3].set(False),
            block_q=128, block_kv=128),
        _qkv((2, 1000, 4, 64)), 1, 3),
    "neighborhood_1d": (lambda q, k, v: nb.neighborhood_attention(q, k, v, 7),
                        _qkv((1, 1000, 4, 64)), 1, 3),
    "neighborhood_2d_dilated": (
        lambda q, k, v: nb.neighborhood_attention(q, k, v, (5, 7),
                                                  dilation=(2, 1)),
        _qkv((1, 30, 45, 2, 32)), 1, 3),
    "neighborhood_3d_strided": (
        lambda q, k, v: nb.neighborhood_attention(
            q, k, v, (3, 5, 5), stride=(1, 2, 2), dilation=(1, 2, 1),
            is_causal=(True, False, False)),
        _qkv((1, 6, 16, 20, 2, 64)), 1, 3),
    "causal_linear": (lambda q, k, v: la.causal_linear_attention(q, k, v),
                      _qkv((1, 1000, 4, 64)), 1, None),
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernels_lower_for_target(target, case):
  fn, args, n_fwd, n_bwd = CASES[case]
  platform = "gpu" if aot.TARGETS[target][0] == "cuda" else "tpu"
  calls = aot.kernel_calls(aot.lower(fn, *args, target=target))
  assert calls == [_CALL[platform]] * n_fwd, calls
  calls = aot.kernel_calls(aot.lower(_grad(fn), *args, target=target))
  # The backward of causal_linear is plain jnp (XLA), so its fwd kernel may
  # be dead code under grad; the flash family runs fwd + dQ + dK/dV kernels.
  if n_bwd is not None:
    assert calls == [_CALL[platform]] * n_bwd, calls
  else:
    assert set(calls) <= {_CALL[platform]}, calls


def test_target_context_selects_platform_defaults():
  assert target_platform() == jax.default_backend()
  assert resolve_interpret(None) == (jax.default_backend() == "cpu")
  with aot.target("h100") as p:
    assert p == "cuda" and target_platform() == "gpu"
    assert not resolve_interpret(None)
    assert fa.BlockSizes.get_default() == fa.BlockSizes.get_default("gpu")
  with aot.target("tpu_v5e") as p:
    assert p == "tpu" and target_platform() == "tpu"
    assert fa.BlockSizes.get_default() == fa.BlockSizes.get_default("tpu")
  assert target_platform() == jax.default_backend()
  with pytest.raises(ValueError, match="target"):
    with aot.target("v100"):
      pass


def test_gpu_head_dim_padding_is_exact_in_interpret_mode(monkeypatch):
  # The GPU path zero-pads head dims to a power of two; check the padding
  # itself (same code, run by the interpreter) against the reference.
  import pallas_kernels.flash as flash_mod
  monkeypatch.setattr(flash_mod, "target_platform", lambda: "gpu")
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 40, 2, 24)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 56, 2, 24)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 56, 2, 40)), jnp.float32)
  f = lambda q, k, v: fa.flash_attention(
      q, k, v, interpret=True, is_causal=True,
      block_sizes=fa.BlockSizes(16, 16, 16, 16))
  # interpret=True keeps the GPU padding off unless forced: force it.
  monkeypatch.setattr(flash_mod, "_pad_head_dims", lambda cfg: True)
  out = f(q, k, v)
  assert out.shape == (1, 40, 2, 40)
  ref = fa.mha_reference(q, k, v, is_causal=True)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)
  g = jax.grad(loss(f), (0, 1, 2))(q, k, v)
  gr = jax.grad(loss(lambda q, k, v: fa.mha_reference(q, k, v,
                                                      is_causal=True)),
                (0, 1, 2))(q, k, v)
  for a, r in zip(g, gr):
    assert a.shape == r.shape
    np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_kernels_compile_to_cubin_and_fit_shared_memory(case):
  # The lowered Triton modules go through Triton's own verifier and
  # compiler for sm_90 (what XLA does on an H100), with the default block
  # sizes and warps; each must fit the per-block shared memory. This found
  # an i1-typed loop bound that lowering alone let through.
  pytest.importorskip("triton")
  fn, args, n_fwd, n_bwd = CASES[case]
  res = aot.compile_triton(_grad(fn) if n_bwd else fn, *args, target="h100")
  assert len(res) == (n_bwd or n_fwd)
  for r in res:
    assert 0 < r["shared"] <= r["max_shared"], r


def test_compile_triton_reports_verifier_errors():
  # A module that does not verify must raise, not pass silently: the same
  # jnp.where(int, int) loop bound that broke the dK/dV kernel.
  pytest.importorskip("triton")
  import functools
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt

  def kern(x_ref, o_ref):
    hi = jnp.where(pl.program_id(0) < 3, 32, 0)
    o_ref[...] = jax.lax.fori_loop(0, hi, lambda t, c: c + x_ref[...],
                                   jnp.zeros((16,), jnp.float32))

  def f(x):
    return pl.pallas_call(
        kern, out_shape=jax.ShapeDtypeStruct((64,), jnp.float32), grid=(4,),
        in_specs=[pl.BlockSpec((16,), lambda i: (i,))],
        out_specs=pl.BlockSpec((16,), lambda i: (i,)),
        compiler_params=plt.CompilerParams(num_warps=4))(x)

  with pytest.raises(Exception):
    aot.compile_triton(f, S((64,), jnp.float32), target="h100")


def test_kernel_aot_report_binary(tmp_path):
  pytest.importorskip("triton")
  import json
  import subprocess
  import sys
  out = subprocess.run(
      [sys.executable, "-m", "experiments.kernel_aot_report",
       f"--workdir={tmp_path}", "--seq_len=512", "--head_dims=64",
       "--dtypes=bfloat16", "--gpu_targets=h100", "--tpu_targets=tpu_v5e"],
      capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  res = json.loads((tmp_path / "results.json").read_text())
  assert res["rows"] and not [r for r in res["rows"] if "error" in r]
  gpu = [r for r in res["rows"] if r["target"] == "h100"]
  assert all(r["fits"] for r in gpu)
  # flash fwd+bwd: forward, dQ and dK/dV kernels, each with shared memory.
  fb = [r for r in gpu if r["config"].startswith("flash h64")
        and r["mode"] == "fwd+bwd"][0]
  assert [k["name"] for k in fb["kernels"]] == ["flash_fwd", "flash_dq",
                                                "flash_dkv"]
  assert all(k["shared"] > 0 for k in fb["kernels"])
  assert "| flash h64 bfloat16 | fwd+bwd |" in (tmp_path / "table.md").read_text()
