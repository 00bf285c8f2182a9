"""Shared plumbing for the experiment binaries.

Every study writes into one workdir:
  results.json     headline numbers (`write_results`)
  metrics.jsonl    one JSON object per logged step (`MetricsWriter`)
  *.png            figures (`save_figure`)
  checkpoints/     orbax checkpoints (`Checkpointer`)

Resume contract: a training loop keeps *all* of its state (params, optimizer
state, step, anything else) in one pytree that it saves with `Checkpointer`;
per-step randomness is derived as `jax.random.fold_in(base_key, step)` so a
resumed run draws exactly the batches an uninterrupted run would, and the
final numbers are identical. `MetricsWriter` drops lines past the restored
step, so the curves have no duplicates after a resume.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging


def to_jsonable(x: Any):
  """Converts numpy/jax scalars and arrays (nested) to plain Python."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    arr = np.asarray(x)
    if arr.ndim == 0:
      v = arr.item()
      if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (math.inf if v > 0 else -math.inf)
      return v
    return to_jsonable(arr.tolist())
  return x


def write_results(workdir: str, results: Dict[str, Any],
                  name: str = "results.json") -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_jsonable(results), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def read_results(workdir: str, name: str = "results.json") -> Dict[str, Any]:
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl.

  `resume_from(step)` drops any line with a step past the restored
  checkpoint (written after the last save by a killed run).
  """

  def __init__(self, workdir: str, name: str = "metrics.jsonl"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, name)

  def resume_from(self, step: Optional[int]) -> None:
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        rec = json.loads(line)
        if step is not None and rec.get("step", -1) <= step:
          keep.append(line)
    with open(self.path, "w") as f:
      f.write("".join(l + "\n" for l in keep))

  def write(self, step: int, **scalars) -> None:
    rec = {"step": int(step)}
    rec.update(to_jsonable(scalars))
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")

  def read(self):
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(l) for l in f if l.strip()]


class Progress:
  """Periodic progress lines with rate and ETA (absl logging + stderr)."""

  def __init__(self, total: int, *, start: int = 0, every: int = 100,
               desc: str = "train", stream=sys.stderr):
    self.total, self.start, self.every, self.desc = total, start, every, desc
    self.t0 = time.time()
    self.stream = stream
    self._last = start

  def update(self, step: int, **scalars) -> None:
    """Call with the number of completed steps."""
    if step - self._last < self.every and step != self.total:
      return
    self._last = step
    done = step - self.start
    dt = max(time.time() - self.t0, 1e-9)
    rate = done / dt
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    extra = " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
    pct = 100.0 * step / max(self.total, 1)
    msg = (f"[{self.desc}] {step}/{self.total} ({pct:5.1f}%) "
           f"{rate:.1f} it/s ETA {_fmt_time(eta)} {extra}")
    logging.info(msg)
    if self.stream is not None:
      print(msg, file=self.stream, flush=True)


def _fmt_time(sec: float) -> str:
  if not math.isfinite(sec):
    return "?"
  sec = int(sec)
  h, rem = divmod(sec, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Checkpointer:
  """Thin orbax CheckpointManager wrapper for one pytree of state.

  >>> ckpt = Checkpointer(workdir)
  >>> step, state = ckpt.restore_or(init_state)   # (0, init_state) if fresh
  >>> ckpt.save(step, state)
  """

  def __init__(self, workdir: str, *, subdir: str = "checkpoints",
               max_to_keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    os.makedirs(self.directory, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, wait: bool = True) -> None:
    self.manager.save(int(step), args=self._ocp.args.StandardSave(state))
    if wait:
      self.manager.wait_until_finished()

  def restore_or(self, init_state: Any):
    """Returns (step, state): the latest checkpoint, or (0, init_state)."""
    step = self.latest_step()
    if step is None:
      return 0, init_state
    abstract = jax.tree_util.tree_map(_abstract_leaf, init_state)
    state = self.manager.restore(
        step, args=self._ocp.args.StandardRestore(abstract))
    return int(step), state

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _abstract_leaf(x):
  if isinstance(x, (jax.Array, np.ndarray)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=getattr(x, "sharding", None))
  return x


def nnx_state(*modules):
  """Pure-dict state of NNX modules/optimizers (orbax-friendly pytree)."""
  from flax import nnx
  return [nnx.state(m).to_pure_dict() for m in modules]


def nnx_load(modules, pure_states) -> None:
  """Inverse of `nnx_state`: writes pure-dict states back into modules."""
  from flax import nnx
  for m, s in zip(modules, pure_states):
    st = nnx.state(m)
    nnx.replace_by_pure_dict(st, s)
    nnx.update(m, st)


def save_figure(fig, workdir: str, name: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name if name.endswith(".png") else name + ".png")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path


def _in_ipython() -> bool:
  """True inside IPython/Jupyter (a kernel or the IPython shell)."""
  ipy = sys.modules.get("IPython")
  try:
    return ipy is not None and ipy.get_ipython() is not None
  except Exception:  # pylint: disable=broad-except
    return False


def setup_matplotlib():
  """pyplot for writing figures; never changes a notebook's backend.

  A binary (no IPython, no MPLBACKEND) renders with the headless Agg
  backend. Inside a Jupyter kernel the backend is left alone: forcing Agg
  there switches off inline display, and the notebooks showed no figures.
  """
  import matplotlib
  if not _in_ipython() and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def rng_key_data(key) -> np.ndarray:
  """Typed PRNG key -> raw uint32 data (checkpointable)."""
  return np.asarray(jax.random.key_data(key))


def rng_wrap(data) -> jax.Array:
  return jax.random.wrap_key_data(np.asarray(data))


# Config keys that may change between a run and its resumption without
# changing its numbers: where to stop (simulated kills) and the device mesh
# (checkpoints restore across meshes; see experiments/sharding.py).
RESUME_SAFE_KEYS = ("stop_after_steps", "mesh")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def guard_config(workdir: str, cfg, *, ignore=RESUME_SAFE_KEYS,
                 name: str = "config.json") -> None:
  """Records the run's config in `workdir`, or refuses a different one.

  A workdir holds one run: resuming it under another config would silently
  mix two experiments in one checkpoint and one metrics file. The first
  call writes DIR/config.json; later calls compare against it and raise a
  ValueError naming every differing key (old -> new), except keys in
  `ignore` (they do not change the numbers).
  """
  cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  new = _flatten(to_jsonable(cfg_dict))
  path = os.path.join(workdir, name)
  if os.path.exists(path):
    with open(path) as f:
      old = _flatten(json.load(f))
    skip = lambda k: k in ignore or k.split(".")[-1] in ignore
    diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
             for k in sorted(set(old) | set(new))
             if not skip(k) and old.get(k) != new.get(k)]
    if diffs:
      raise ValueError(
          f"--workdir {workdir} holds a run with a different config ("
          + "; ".join(diffs) + "). Use a new --workdir, or delete this one, "
          "to start another run.")
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(new, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def define_study_flags(config_file: str, preset: str = "default") -> None:
  """Defines a study binary's `--workdir` and `--config` (path:preset) flags.

  Call it under `if __name__ == "__main__":` so that experiment modules can be
  imported side by side (tests, colabs) without duplicate-flag errors; `main`
  then reads `flags.FLAGS.workdir` and `flags.FLAGS.config`.
  """
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "Output directory.")
  config_flags.DEFINE_config_file(
      "config",
      os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                   f"{config_file}:{preset}"),
      "Config file and preset (path:preset).")


def run_study_main(run_study, stopped=()):
  """The body of a study binary's `main`, after `define_study_flags`.

  Quietens absl INFO logging (orbax is chatty) unless --verbosity was given,
  checks --workdir, runs `run_study(config, workdir)` and writes
  results.json. An exception in `stopped` (a deliberate early stop, e.g.
  `stop_after_steps`) is printed and gives (None, None).
  Returns (results, path to results.json).
  """
  from absl import app, flags
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  workdir = flags.FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  guard_config(workdir, flags.FLAGS.config)
  try:
    res = run_study(flags.FLAGS.config, workdir)
  except tuple(stopped) as e:  # pylint: disable=catching-non-exception
    logging.warning("%s", e)
    print(str(e), flush=True)
    return None, None
  return res, write_results(workdir, res)
