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
