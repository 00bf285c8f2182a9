"""Real multi-process JAX on this machine: 2 processes x 2 CPU devices.

Each process is a separate Python interpreter joined by
`jax.distributed.initialize` (coordinator on a free local port, gloo CPU
collectives), started with the environment `experiments.launch` gives it, so
the global mesh spans processes exactly as on a TPU pod slice or a SLURM
cluster. Every subprocess has a timeout and the distributed runtime a short
heartbeat timeout: a broken run fails the test instead of hanging it.

* ring and Ulysses attention over a mesh axis that crosses processes equal
  single-device attention (values and gradients; NaN/Inf in padded key/value
  slots reach nothing); an FSDP-sharded training state is checkpointed
  collectively by 2 processes and restored in 1;
* icl_regression (tiny) as 2 processes equals 1 process on the same mesh;
  killing one process mid-training makes the other exit with the runtime's
  error within the heartbeat bound; re-running resumes from the last
  complete checkpoint to identical final numbers; the 2-process checkpoint
  restores (and re-evaluates to the same numbers) in one process on one
  device.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import launch
from tests.multidevice import forced_devices_env
from tests.test_icl_mesh import _numbers  # the trained-model numbers compared

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "distributed_checks.py")
TIMEOUT = 600          # per subprocess (a loaded 2-core machine)
HEARTBEAT_S = 10       # a dead peer is detected within ~this


def _env(i, port):
  return launch.process_env(i, 2, port, devices_per_process=2,
                            heartbeat_timeout_s=HEARTBEAT_S,
                            init_timeout_s=120)


def _start(cmd, logdir, tag):
  """Starts process 0 and 1 of `cmd`; output to logdir/<tag>_p<i>.log."""
  port = launch.free_port()
  procs, logs = [], []
  for i in range(2):
    path = os.path.join(logdir, f"{tag}_p{i}.log")
    logs.append(path)
    procs.append(subprocess.Popen(
        cmd, env=_env(i, port), cwd=ROOT, stdout=open(path, "w"),
        stderr=subprocess.STDOUT))
  return procs, logs


def _read(path):
  with open(path) as f:
    return f.read()


def _wait_all(procs, logs, timeout=TIMEOUT):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    pytest.fail("multi-process run timed out:\n" +
                "\n".join(_read(l)[-3000:] for l in logs))
  bad = [i for i, p in enumerate(procs) if p.returncode != 0]
  if bad:
    pytest.fail(f"processes {bad} failed:\n" +
                "\n".join(_read(logs[i])[-5000:] for i in bad))
  return [_read(l) for l in logs]


def _run_one(cmd, devices, timeout=TIMEOUT):
  proc = subprocess.run(cmd, env=forced_devices_env(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    pytest.fail(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return proc.stdout


@pytest.mark.slow
def test_attention_and_sharded_checkpoint_across_processes(tmp_path):
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  procs, logs = _start([sys.executable, SCRIPT, "mp", str(ckpt)], tmp_path,
                       "mp")
  outs = _wait_all(procs, logs)
  quick = bool(os.environ.get("CI"))
  for out in outs:     # both processes checked everything
    for spec in ("seq:4",) + (() if quick else ("seq:2,data:2",)):
      for name in ("ring causal zigzag", "ulysses causal",
                   "ring segments causal nan-padded kv",
                   "ulysses segments causal nan-padded kv"):
        assert f"OK mp {name} [{spec}]" in out, out[-3000:]
    if not quick:
      for name in ("ring full", "ring causal striped", "ulysses full"):
        assert f"OK mp {name} [seq:4]" in out, out[-3000:]
    assert "OK ckpt_save on 4 devices of 2 processes" in out, out[-3000:]
  # The FSDP state written collectively by 2 processes, restored on 1 device.
  out = _run_one([sys.executable, SCRIPT, "ckpt_restore", str(ckpt)], 1)
  assert "params identical" in out and "next step matches" in out, out


ICL = ["-m", "experiments.icl_regression",
       "--config=experiments/configs/icl_regression.py:tiny",
       "--config.heads=2", "--config.linear_heads=1", "--config.steps=120",
       "--config.ckpt_every=20", "--config.eval_samples=64",
       "--config.eval_chunk=64"]


def _icl_numbers(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return _numbers(json.load(f), workdir)


def _assert_numbers(got, want, rtol):
  assert set(got) == set(want), (sorted(got), sorted(want))
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=1e-7,
                               err_msg=k)


@pytest.mark.slow
def test_icl_two_processes_kill_resume_restore(tmp_path):
  ref, run = tmp_path / "one_process", tmp_path / "two_processes"
  # One process, the same 4-device mesh.
  _run_one([sys.executable] + ICL + [f"--workdir={ref}",
                                     "--config.mesh=data:4"], 4)
  want = _icl_numbers(ref)

  cmd = [sys.executable] + ICL + [f"--workdir={run}", "--config.mesh=data:-1"]
  procs, logs = _start(cmd, tmp_path, "killed")
  ckdir = run / "checkpoints"
  deadline = time.time() + TIMEOUT
  while not (ckdir.is_dir() and any(d.name.isdigit()
                                    for d in ckdir.iterdir())):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      for p in procs:
        p.kill()
      pytest.fail("no checkpoint appeared:\n" + _read(logs[0])[-3000:])
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  try:
    rc = procs[0].wait(timeout=6 * HEARTBEAT_S + 60)
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung after its peer was killed")
  waited = time.time() - killed_at
  log0 = _read(logs[0])
  assert rc != 0, log0[-3000:]
  assert "another task died" in log0 or "stopped sending heartbeats" in log0, \
      log0[-3000:]
  assert not (run / "results.json").exists()
  print(f"survivor exited (status {rc}) {waited:.1f}s after the kill")

  # The same command again: resumes from the last complete checkpoint.
  procs, logs = _start(cmd, tmp_path, "resumed")
  out0 = _wait_all(procs, logs)[0]
  # It resumed (no progress line before the checkpoint) and finished.
  assert " 10/120 " not in out0 and " 120/120 " in out0, out0[-3000:]
  _assert_numbers(_icl_numbers(run), want, rtol=1e-6)
  steps = [json.loads(l)["step"] for l in open(run / "metrics.jsonl")]
  assert steps == sorted(set(steps)), steps   # no duplicate lines

  # The 2-process checkpoint restored in one process on one device (the
  # mesh is a resume-safe key): evaluation of the restored state only.
  before = _icl_numbers(run)
  os.remove(run / "results.json")
  _run_one([sys.executable] + ICL + [f"--workdir={run}",
                                     "--config.mesh=data:1"], 1)
  _assert_numbers(_icl_numbers(run), before, rtol=1e-6)


def test_launcher_environment_and_errors():
  env = launch.process_env(1, 2, 12345, devices_per_process=3,
                           heartbeat_timeout_s=7, base={"XLA_FLAGS": "--x=1"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345"
  assert env["JAX_NUM_PROCESSES"] == "2" and env["JAX_PROCESS_ID"] == "1"
  assert env["ATTNJAX_DIST_HEARTBEAT_TIMEOUT_S"] == "7"
  assert env["XLA_FLAGS"].split() == [
      "--x=1", "--xla_force_host_platform_device_count=3"]
  with pytest.raises(ValueError, match="process_id"):
    launch.process_env(2, 2, 1)
  with pytest.raises(ValueError, match="num_processes"):
    launch.launch(["true"], num_processes=0)


def test_launcher_reports_the_failing_process(tmp_path):
  """One process fails: the launcher stops the other and returns its status."""
  import io
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
          "time.sleep(60)\n")
  out, err = io.StringIO(), io.StringIO()
  t0 = time.time()
  rc = launch.launch([sys.executable, "-c", code], num_processes=2,
                     grace_s=1.0, stdout=out, stderr=err)
  assert rc == 3, err.getvalue()
  assert time.time() - t0 < 30
  assert "process 1 exited with status 3" in err.getvalue()
  assert "failed: process 1" in err.getvalue()
