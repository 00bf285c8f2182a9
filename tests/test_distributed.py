"""Sequence-parallel attention and sharded training on forced host devices.

The multi-device checks live in tests/distributed_checks.py and run in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N, so the
forced devices are set in the test process only and never leak into the
other tests (jax reads XLA_FLAGS once, at backend initialization).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.multidevice import forced_devices_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "distributed_checks.py")


def _run(args, devices, timeout=600):
  env = forced_devices_env(devices)
  proc = subprocess.run([sys.executable, SCRIPT] + list(args), env=env,
                        cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"{args} on {devices} devices failed:\n{proc.stdout}\n"
                f"{proc.stderr[-6000:]}")
  return proc.stdout


def test_attention_windows_and_checkpoint_on_8_devices(tmp_path):
  """One subprocess on 8 forced devices runs three groups of checks (one
  interpreter start and jax set-up instead of three):

  * attention: Ring (zigzag/striped/contiguous) and Ulysses vs
    dot_product_attention, causal and not, values and gradients,
    P = 2, 4, 8; errors.
  * ring_window: Ring attention with local windows (causal sliding,
    asymmetric, two-sided, reaching 0..all shards; segment ids with NaN/Inf
    padding) vs dot_product_attention, values and gradients, P = 4.
  * ckpt_save: sharded training saved on 8 devices; then restored on 2 (a
    second subprocess) with equal params and the same next step."""
  out = _run(["attention,ring_window,ckpt_save", str(tmp_path)], devices=8)
  # attention
  for p in (2, 4) if os.environ.get("CI") else (2, 4, 8):   # as the script
    for name in ("ring causal zigzag", "ring full", "ulysses causal",
                 "ulysses full"):
      assert f"OK {name} P={p}" in out, out
  assert "OK ring causal striped P=4" in out
  assert "OK ring causal contiguous P=4" in out
  for name in ("causal zigzag", "causal striped", "causal contiguous", "full"):
    assert f"OK ring segments {name} P=4" in out, out
  assert "OK ulysses segments causal P=4" in out
  # ring_window
  for w, c in (("5", True), ("12", True), ("(7, 3)", True), ("(3, 9)", False),
               ("(20, 0)", False), ("2", False), ("40", True)):
    assert f"OK ring window {w} causal={c} P=4" in out, out
  assert "OK ring window segments nan-padded kv P=4" in out, out
  for e in ("cross", "permuted zigzag", "negative"):
    assert f"OK err window {e}" in out, out
  assert "OK err block_q" in out, out
  # ckpt_save on 8, restored on 2
  assert "OK ckpt_save on 8 devices" in out, out
  out = _run(["ckpt_restore", str(tmp_path)], devices=2)
  assert "params identical" in out and "next step matches" in out, out


def test_ring_layout_argument_errors():
  """Issue 15: axis out of range and num_shards=0 raise ValueError (axis=7
  used to wrap around to a valid axis)."""
  import jax.numpy as jnp
  from attnjax.distributed import (from_ring_layout, ring_permutation,
                                   to_ring_layout)
  x = jnp.zeros((2, 8, 3))
  for fn in (to_ring_layout, from_ring_layout):
    for axis in (7, -4, 1.0):
      with pytest.raises(ValueError, match="axis"):
        fn(x, 2, "zigzag", axis=axis)
    np.testing.assert_array_equal(fn(x, 2, "zigzag", axis=-2),
                                  fn(x, 2, "zigzag", axis=1))
    with pytest.raises(ValueError, match="num_shards"):
      fn(x, 0, "zigzag")
  for bad in (0, -2, 2.0, True):
    with pytest.raises(ValueError, match="num_shards"):
      ring_permutation(8, bad, "zigzag")
  with pytest.raises(ValueError, match="seq_len"):
    ring_permutation(-8, 2, "contiguous")
  np.testing.assert_array_equal(ring_permutation(np.int64(8), np.int64(2),
                                                 "striped"),
                                [0, 2, 4, 6, 1, 3, 5, 7])


def test_forced_devices_do_not_leak():
  import jax
  assert "xla_force_host_platform_device_count=8" not in os.environ.get(
      "XLA_FLAGS", "")
  del jax


def test_ring_permutation_is_a_permutation():
  from attnjax.distributed import ring_permutation
  for layout in ("zigzag", "striped", "contiguous"):
    perm = ring_permutation(48, 4, layout)
    np.testing.assert_array_equal(np.sort(perm), np.arange(48))
  with pytest.raises(ValueError, match="seq_len"):
    ring_permutation(12, 4, "zigzag")


def test_parse_mesh():
  from experiments.sharding import parse_mesh
  assert parse_mesh("data:2,seq:4", 8) == {"data": 2, "seq": 4}
  assert parse_mesh("data:-1,seq:2", 8) == {"data": 4, "seq": 2}
  assert parse_mesh(None, 4) == {"data": 4}
  assert parse_mesh({"data": 1, "seq": 2}, 8) == {"data": 1, "seq": 2}
  assert parse_mesh("data:3", 8) == {"data": 3}  # a subset of the devices
  for bad in ("data=2", "data:2,data:2", "data:-1,seq:-1", "data:-1,seq:3",
              "data:x", "data:16", "data:0"):
    with pytest.raises(ValueError, match="mesh"):
      parse_mesh(bad, 8)


def test_bench_distributed_smoke(tmp_path):
  """The benchmark binary runs and per-device memory drops as P grows."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(   # keeps the test run's flags (conftest)
      [os.environ.get("XLA_FLAGS", ""),
       "--xla_force_host_platform_device_count=4"]).strip()
  env["PYTHONPATH"] = ROOT
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.bench_distributed",
       f"--workdir={tmp_path}", "--quick", "--devices=1,4",
       "--methods=ring_zigzag,ulysses", "--modes=fwd_bwd", "--repeats=1",
       "--host_devices=4"], env=env, cwd=ROOT, capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  import json
  with open(tmp_path / "results.json") as f:
    rows = json.load(f)["rows"]
  mem = {(r["method"], r["devices"]): r["mem_per_device_bytes"] for r in rows}
  assert set(mem) == {(m, p) for m in ("ring_zigzag", "ulysses")
                      for p in (1, 4)}, mem
  for m in ("ring_zigzag", "ulysses"):
    assert 0 < mem[(m, 4)] < 0.5 * mem[(m, 1)], mem
  assert "ring_zigzag" in proc.stdout and "mem/dev MB" in proc.stdout


def test_multiprocess_helpers_on_one_process(monkeypatch):
  """sharding's multi-process helpers degrade to the one-process case; env
  parsing; a mesh that leaves a process without devices is refused."""
  import types
  import jax
  from jax.sharding import NamedSharding, PartitionSpec
  from experiments import sharding
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
              "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert sharding.maybe_initialize_distributed() is False   # nothing to join
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    sharding.maybe_initialize_distributed()
  assert not jax.distributed.is_initialized()
  assert sharding.is_main_process()
  sharding.barrier("one process: a no-op")

  mesh = sharding.make_mesh("data:1")
  x = np.arange(24.0).reshape(4, 6)
  assert sharding.process_slice(x.shape, mesh, seq_axis="seq") == (
      slice(0, 4), slice(0, 6))
  g = sharding.global_batch({"x": x}, mesh)["x"]
  np.testing.assert_array_equal(sharding.fetch(g), x)
  rep = NamedSharding(mesh, PartitionSpec())
  np.testing.assert_array_equal(np.asarray(sharding.put(x, rep)), x)
  key = sharding.put(jax.random.key(3), rep)
  np.testing.assert_array_equal(jax.random.key_data(key),
                                jax.random.key_data(jax.random.key(3)))

  fake = [types.SimpleNamespace(id=i, process_index=i // 2) for i in range(4)]
  with pytest.raises(ValueError, match=r"none of processes \[1\]"):
    sharding.make_mesh("data:2", devices=fake)
