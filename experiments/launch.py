"""Starts N local processes of one command as a JAX multi-process run.

For trying multi-process JAX on one machine (and for the tests): every
process gets the environment a cluster scheduler would give it, and the
command itself is unchanged.

  python -m experiments.launch --num_processes=2 --devices_per_process=2 -- \\
      python -m experiments.icl_regression --workdir=runs/icl2 \\
      --config=experiments/configs/icl_regression.py:tiny

Process i runs with

  JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>   (read by JAX itself)
  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i           (read by
                         experiments.sharding.maybe_initialize_distributed)
  ATTNJAX_DIST_HEARTBEAT_TIMEOUT_S, ATTNJAX_DIST_INIT_TIMEOUT_S (bounded waits)
  and, with --platform=cpu (the default), JAX_PLATFORMS=cpu and
  XLA_FLAGS=--xla_force_host_platform_device_count=<devices_per_process>
  (CPU collectives across processes use gloo, JAX's default).

The study binaries call `maybe_initialize_distributed()` first, which calls
`jax.distributed.initialize` with these; then `jax.devices()` lists all
N x devices_per_process devices and the binary's mesh spans them.

Output: each line of a child's stdout/stderr is echoed with a `[pI]` prefix.
Faults: when a process exits with an error, the others are expected to exit
on their own (JAX's coordination service stops them once the dead peer
misses its heartbeats); whatever is still running `--grace_s` seconds later
is terminated. The launcher's exit status is the first failing process's
(0 when all succeed), and it prints which process failed.

On a real cluster do not use this: run the same command once per host under
SLURM (`srun`), mpirun, Kubernetes or on every TPU VM worker; JAX detects
those environments (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int, *,
                devices_per_process: int = 1, platform: str = "cpu",
                heartbeat_timeout_s: Optional[int] = None,
                init_timeout_s: Optional[int] = None,
                base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """The environment of process `process_id` of a local N-process run."""
  if not 0 <= process_id < num_processes:
    raise ValueError(f"`process_id` must be in [0, {num_processes}), got "
                     f"{process_id}.")
  env = dict(os.environ if base is None else base)
  env["JAX_COORDINATOR_ADDRESS"] = f"127.0.0.1:{int(port)}"
  env["JAX_NUM_PROCESSES"] = str(int(num_processes))
  env["JAX_PROCESS_ID"] = str(int(process_id))
  if heartbeat_timeout_s is not None:
    env["ATTNJAX_DIST_HEARTBEAT_TIMEOUT_S"] = str(int(heartbeat_timeout_s))
  if init_timeout_s is not None:
    env["ATTNJAX_DIST_INIT_TIMEOUT_S"] = str(int(init_timeout_s))
  if platform == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith(_DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"{_DEVICE_FLAG}={int(devices_per_process)}"])
  elif platform:
    env["JAX_PLATFORMS"] = platform
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = os.pathsep.join(
      [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(prefix + line)
    out.flush()
  stream.close()


def _stop(procs: Sequence[subprocess.Popen], wait_s: float = 5.0) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.time() + wait_s
  for p in procs:
    if p.poll() is None:
      try:
        p.wait(max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def launch(command: Sequence[str], *, num_processes: int,
           devices_per_process: int = 1, platform: str = "cpu",
           port: int = 0, heartbeat_timeout_s: int = 20,
           init_timeout_s: int = 120, grace_s: float = 60.0,
           timeout_s: float = 0.0, stdout=None, stderr=None) -> int:
  """Runs `command` as `num_processes` processes; returns the exit status.

  0 when every process succeeded; otherwise the status of the first process
  that failed (a process killed by signal S gives 128 + S). `timeout_s` > 0
  bounds the whole run (all processes are stopped, status 124).
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"`num_processes` ({num_processes}) and "
                     f"`devices_per_process` ({devices_per_process}) must be "
                     ">= 1.")
  if not command:
    raise ValueError("`command` is empty; pass it after `--`.")
  stdout = sys.stdout if stdout is None else stdout
  stderr = sys.stderr if stderr is None else stderr
  port = port or free_port()
  procs: List[subprocess.Popen] = []
  pumps = []
  for i in range(num_processes):
    env = process_env(i, num_processes, port,
                      devices_per_process=devices_per_process,
                      platform=platform,
                      heartbeat_timeout_s=heartbeat_timeout_s,
                      init_timeout_s=init_timeout_s)
    p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, bufsize=1)
    procs.append(p)
    for stream, out in ((p.stdout, stdout), (p.stderr, stderr)):
      th = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out),
                            daemon=True)
      th.start()
      pumps.append(th)

  def _forward(signum, _frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {}
  if threading.current_thread() is threading.main_thread():
    for sig in (signal.SIGINT, signal.SIGTERM):
      old[sig] = signal.signal(sig, _forward)
  start = time.time()
  first_fail: Optional[int] = None
  fail_time = None
  status = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      for i, c in enumerate(codes):
        if c not in (None, 0) and first_fail is None:
          first_fail, fail_time = i, time.time()
          status = c if c > 0 else 128 - c
          stderr.write(f"[launch] process {i} exited with status {c}; "
                       f"waiting up to {grace_s:.0f}s for the others\n")
      if all(c is not None for c in codes):
        break
      if fail_time is not None and time.time() - fail_time > grace_s:
        alive = [i for i, c in enumerate(codes) if c is None]
        stderr.write(f"[launch] processes {alive} still running {grace_s:.0f}"
                     "s after the failure; terminating them\n")
        _stop(procs)
        break
      if timeout_s and time.time() - start > timeout_s:
        stderr.write(f"[launch] timeout after {timeout_s:.0f}s; stopping all "
                     "processes\n")
        _stop(procs)
        status = 124
        break
      time.sleep(0.1)
  finally:
    _stop(procs)
    for th in pumps:
      th.join(timeout=5)
    for sig, h in old.items():
      signal.signal(sig, h)
  if status == 0:
    for i, p in enumerate(procs):
      if p.returncode:
        status = p.returncode if p.returncode > 0 else 128 - p.returncode
        first_fail = i if first_fail is None else first_fail
        break
  if status:
    stderr.write(f"[launch] failed: process {first_fail} (status {status})\n")
  return status


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    cut = argv.index("--")
    own, command = argv[:cut], argv[cut + 1:]
  else:
    own, command = argv, []
  ap = argparse.ArgumentParser(
      prog="python -m experiments.launch",
      description="Run COMMAND as N local JAX processes (see module doc).")
  ap.add_argument("--num_processes", type=int, default=2)
  ap.add_argument("--devices_per_process", type=int, default=1,
                  help="forced host CPU devices per process (platform cpu)")
  ap.add_argument("--platform", default="cpu",
                  help="JAX_PLATFORMS for the children ('' keeps yours)")
  ap.add_argument("--port", type=int, default=0, help="0: a free port")
  ap.add_argument("--heartbeat_timeout_s", type=int, default=20)
  ap.add_argument("--init_timeout_s", type=int, default=120)
  ap.add_argument("--grace_s", type=float, default=60.0)
  ap.add_argument("--timeout_s", type=float, default=0.0,
                  help="bound on the whole run (0: none)")
  args = ap.parse_args(own)
  if not command:
    ap.error("give the command after `--`")
  return launch(command, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process,
                platform=args.platform, port=args.port,
                heartbeat_timeout_s=args.heartbeat_timeout_s,
                init_timeout_s=args.init_timeout_s, grace_s=args.grace_s,
                timeout_s=args.timeout_s)


if __name__ == "__main__":
  sys.exit(main())
