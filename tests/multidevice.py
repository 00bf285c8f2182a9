"""Environment for subprocesses that run on N forced CPU host devices.

JAX reads XLA_FLAGS once, at backend initialization, so multi-device checks
run in a subprocess whose environment alone forces the devices; the pytest
process keeps its single device.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAG = "--xla_force_host_platform_device_count"


def forced_devices_env(devices: int) -> dict:
  """os.environ with `devices` forced host CPU devices and the repo importable."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith(_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def run_forced(*argv: str, devices: int = 4, timeout: int = 600) -> list:
  """Runs `python *argv` (e.g. "-c", code, arg or "-m", module, flags) on
  `devices` forced host devices from the repo root; fails the test with its
  output unless it exits 0. Returns the stdout lines."""
  import subprocess
  import sys

  import pytest
  proc = subprocess.run([sys.executable, *argv],
                        env=forced_devices_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"{devices}-device run failed:\n{proc.stdout}\n"
                f"{proc.stderr[-6000:]}")
  return proc.stdout.splitlines()


def assert_data_mesh_checked(lines, batch_field: str = "config.batch_size",
                             devices: int = 4) -> None:
  """What every study's data-parallel subprocess prints (see the tests'
  `_CODE`): a ValueError naming config.mesh and the batch field for a batch
  not divisible by `data`, then the mesh {'data': devices}, then
  'all-reduce' found in the compiled training step (the batch is split)."""
  out = "\n".join(lines)
  err = [l for l in lines if l.startswith("ValueError")]
  assert err and "config.mesh" in err[0] and batch_field in err[0], out
  assert f"mesh {{'data': {devices}}}" in lines, out
  assert "all-reduce" in lines, out
