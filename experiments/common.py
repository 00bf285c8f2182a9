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

import ast
import contextlib
import importlib.util
import io
import json
import math
import os
import sys
import time
import tokenize
from typing import Any, Dict, Optional, Sequence, Tuple

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


# --- Multi-process hooks (experiments/sharding.py, docs/distributed.md) ---
# In a jax.distributed run every process executes the binary; only process 0
# writes results, metrics, figures and config records (orbax checkpoints are
# written collectively by all). Single process: always the writer.


def is_main_process() -> bool:
  """True unless this is a process other than 0 of a jax.distributed run."""
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def _sync_processes(name: str) -> None:
  """Barrier so that files process 0 just wrote are visible to all."""
  if jax.distributed.is_initialized() and jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Stopped(Exception):
  """Raised when `stop_after_steps` is reached (a simulated kill)."""


class PhaseStop(Exception):
  """A stop injected at a phase boundary (`phase`): a deterministic kill."""


STOP_ENV = "ATTNJAX_STOP_AT"
_PHASE_COUNTS: Dict[str, int] = {}


def phase(name: str) -> None:
  """Marks a phase boundary; raises PhaseStop where $ATTNJAX_STOP_AT says.

  ATTNJAX_STOP_AT=NAME[:K] stops the K-th time (default 1) boundary NAME is
  reached in this process. Boundaries marked by this module and
  experiments/sweep.py: "checkpoint" (after a checkpoint is written),
  "eval" (a cell/run evaluated, its result not yet written), "cell" (after
  a sweep cell's result file), "figure" (after one figure file, the others
  not yet written). The resume tests kill every binary at each of them.
  """
  spec = os.environ.get(STOP_ENV, "")
  if not spec:
    return
  want, _, k = spec.partition(":")
  if want != name:
    return
  _PHASE_COUNTS[name] = _PHASE_COUNTS.get(name, 0) + 1
  if _PHASE_COUNTS[name] == int(k or 1):
    _PHASE_COUNTS.clear()
    raise PhaseStop(f"stopped at phase {name!r} (#{int(k or 1)}) by "
                    f"{STOP_ENV}={spec}; re-run to resume.")


def reset_phases() -> None:
  _PHASE_COUNTS.clear()


def write_results(workdir: str, results: Dict[str, Any],
                  name: str = "results.json") -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  if is_main_process():
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(to_jsonable(results), f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  _sync_processes("write_results:" + path)
  return path


def read_results(workdir: str, name: str = "results.json") -> Dict[str, Any]:
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to workdir/metrics.jsonl.

  `resume_from(step)` drops any line with a step past the restored
  checkpoint (written after the last save by a killed run). A run killed in
  the middle of `write` can leave a last line without its newline and cut
  short: `resume_from` drops it and `read` leaves it out (any other line
  that is not JSON is an error naming the file and line). `resume_from`
  rewrites the file through a temporary file and `os.replace`, so a kill
  during the rewrite leaves the old file whole.
  """

  def __init__(self, workdir: str, name: str = "metrics.jsonl"):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, name)

  def _records(self):
    """[(line, record)] of the file; a cut-short last line is left out."""
    with open(self.path) as f:
      lines = f.read().split("\n")
    # Everything before the last "\n" was written whole; what follows it
    # (normally "") is a record only if it parses.
    out = []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        out.append((line.strip(), json.loads(line)))
      except json.JSONDecodeError as e:
        if n == len(lines):      # no newline after it: a cut-short write
          break
        raise ValueError(f"{self.path}, line {n}: not a JSON record ({e}): "
                         f"{line[:80]!r}") from None
    return out

  def resume_from(self, step: Optional[int]) -> None:
    if not is_main_process():
      return
    if not os.path.exists(self.path):
      return
    keep = [line for line, rec in self._records()
            if step is not None and rec.get("step", -1) <= step]
    tmp = self.path + ".tmp"
    try:
      with open(tmp, "w") as f:
        f.write("".join(l + "\n" for l in keep))
      os.replace(tmp, self.path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  def write(self, step: int, **scalars) -> None:
    if not is_main_process():
      return
    rec = {"step": int(step)}
    rec.update(to_jsonable(scalars))
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")

  def read(self):
    if not os.path.exists(self.path):
      return []
    return [rec for _, rec in self._records()]


def setup_logging() -> None:
  """The one logging set-up of every binary.

  Progress, resume and completion messages go to stdout (`Progress`,
  `say`, `log_resume`, `finished_run`); absl INFO logging (orbax writes
  100s of lines per run) is off unless --verbosity was given.
  """
  from absl import flags
  try:
    present = flags.FLAGS["verbosity"].present
  except (KeyError, flags.UnparsedFlagAccessError):
    present = False
  if not present:
    logging.set_verbosity(logging.WARNING)
    import logging as std_logging
    for name in ("absl", "orbax", "orbax.checkpoint"):
      std_logging.getLogger(name).setLevel(std_logging.WARNING)


def say(msg: str) -> None:
  """A user-facing status line: stdout (process 0), flushed."""
  logging.info("%s", msg)
  if is_main_process():
    print(msg, flush=True)


def log_resume(step: int, total: int, what: str = "step") -> None:
  """'resumed from step N of T' when a run restarts from a checkpoint."""
  if step:
    say(f"resumed from {what} {step} of {total}")


def finished_run(workdir: str, name: str = "results.json"):
  """The results of a completed run in `workdir` (saying so), else None."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  say(f"{workdir} holds a completed run ({name}): nothing to do. Delete "
      f"{path} to recompute its evaluation and figures from the "
      "checkpoints, or use a new --workdir.")
  return read_results(workdir, name)


class Progress:
  """Periodic progress lines with rate and a truthful ETA (stdout).

  The rate is measured from the first update on, so compilation (before
  the first update) does not inflate the ETA. For phases whose steps cost
  different amounts (cells of different sizes), count work units (e.g.
  steps x batch x cost) rather than steps, and name them with `unit`.
  """

  def __init__(self, total: int, *, start: int = 0, every: int = 100,
               desc: str = "train", stream="stdout", unit: str = "it"):
    self.total, self.start, self.every, self.desc = total, start, every, desc
    self.t0 = time.time()
    self.stream = stream
    self.unit = unit
    self._last = start
    self._first = None              # (time, step) of the first update

  def update(self, step: int, **scalars) -> None:
    """Call with the number of completed steps (or work units)."""
    now = time.time()
    if self._first is None:
      self._first = (now, step)
    if step - self._last < self.every and step != self.total:
      return
    self._last = step
    t_first, s_first = self._first
    if step > s_first and now > t_first:
      rate = (step - s_first) / (now - t_first)
      eta = (self.total - step) / rate
    else:
      # The first update's rate includes start-up and compilation: no
      # truthful ETA yet.
      rate = (step - self.start) / max(now - self.t0, 1e-9)
      eta = float("inf") if step < self.total else 0.0
    extra = " ".join(f"{k}={float(v):.4g}" for k, v in scalars.items())
    pct = 100.0 * step / max(self.total, 1)
    msg = (f"[{self.desc}] {step}/{self.total} ({pct:5.1f}%) "
           f"{rate:.3g} {self.unit}/s ETA {_fmt_time(eta)} {extra}").rstrip()
    logging.info("%s", msg)
    stream = sys.stdout if self.stream == "stdout" else self.stream
    if stream is not None and is_main_process():
      print(msg, file=stream, flush=True)


def ordered_timings(measure, *, retries: int = 3):
  """Times a (part, whole) pair whose whole must take longer than its part.

  `measure()` -> (t_part, t_whole), e.g. (forward, forward + backward). A
  whole measured no slower than its part is impossible: it means the
  difference is below the timing noise. Re-measures up to `retries` times
  while that happens and returns (t_part, t_whole, below_noise), keeping the
  last measurement; below_noise=True marks a pair whose ordering never
  became possible, to be reported as "below the noise floor", not as a
  result.
  """
  t_part, t_whole = measure()
  for _ in range(retries):
    if t_whole > t_part:
      break
    t_part, t_whole = measure()
  return t_part, t_whole, not t_whole > t_part


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
      phase("checkpoint")

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
  if is_main_process():             # multi-process: process 0 writes
    tmp = path[:-4] + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)           # a kill never leaves half a PNG
  import matplotlib.pyplot as plt
  plt.close(fig)
  phase("figure")
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


# --- configs: presets, validation, field docs, comma-separated overrides ----

def parse_preset(arg: Optional[str], presets: Sequence[str], *,
                 modifiers: Sequence[str] = (),
                 default: Optional[str] = None) -> Tuple[str, Tuple[str, ...]]:
  """'vit,smoke' -> ('vit', ('smoke',)); refuses names it does not know.

  The part before the first comma must be one of `presets` (empty: `default`,
  else the first preset); the rest must be `modifiers`. An unknown name
  raises a ValueError listing the allowed values (a typo such as
  `:vit,smoek` must not silently run the full default).
  """
  parts = [p.strip() for p in (arg or "").split(",")]
  base = parts[0] or default or presets[0]
  if base not in presets:
    raise ValueError(f"unknown preset {base!r}: choose one of "
                     f"{', '.join(presets)}"
                     + (f" (optionally followed by ,{'/,'.join(modifiers)})"
                        if modifiers else "") + ".")
  mods = tuple(p for p in parts[1:] if p)
  bad = [m for m in mods if m not in modifiers]
  if bad:
    raise ValueError(
        f"unknown preset modifier(s) {', '.join(map(repr, bad))} in "
        f"{arg!r}: allowed after the preset: "
        f"{', '.join(modifiers) if modifiers else 'none'}.")
  return base, mods


def new_config(arg: Optional[str], presets: Sequence[str], *,
               default: Optional[str] = None, aliases=None):
  """The start of every study's `get_config(preset)`: a ConfigDict whose
  `preset` field is the validated preset name (`parse_preset`; `aliases`
  maps other accepted names to presets, e.g. {"default": "cpu"})."""
  import ml_collections
  arg = (aliases or {}).get(arg, arg)
  c = ml_collections.ConfigDict()
  c.preset = parse_preset(arg, presets, default=default)[0]
  return c


# Generic constraints, by field name (the last dotted component), applied to
# every study config that has such a field. A config module may add or
# override them with CONSTRAINTS = {name: kind} and restrict a field (or
# every element of a list-valued field) to names with CHOICES = {name:
# (allowed, ...)}. Kinds: "int>0", "int>=0", ">0", ">=0", "[0,1]", "(0,1)",
# "ints>0" (a list of positive ints: "16,4,1" or a tuple), "ints>0*" (the
# same, or empty).
GENERIC_CONSTRAINTS = {
    **{k: "int>0" for k in (
        "steps", "batch_size", "chunk", "ckpt_every", "eval_every",
        "eval_batch", "eval_chunk", "eval_samples", "log_every", "dim", "d",
        "n", "L", "num_keys", "num_values", "num_heads", "num_pairs",
        "num_layers", "num_repeats", "num_val", "num_test", "num_tasks",
        "feature_batch", "width", "trials", "fixed_head_size", "image_size",
        "in_chans", "num_classes", "kernel_grid")},
    **{k: "int>=0" for k in ("stop_after_steps", "seed", "warmup",
                             "warmup_steps", "mlp_dim")},
    **{k: ">0" for k in ("lr", "qk_std")},
    **{k: ">=0" for k in ("label_noise", "weight_decay", "label_smoothing",
                          "sigma2", "grad_clip", "moh_balance_weight")},
    "test_fraction": "(0,1)", "min_lr_ratio": "[0,1]",
    **{k: "ints>0" for k in (
        "ranks", "depths", "num_points", "heads", "head_sizes",
        "sample_sizes", "eval_lengths", "estimator_lengths",
        "reduced_lengths")},
    "linear_heads": "ints>0*",
}

_KIND_TEXT = {"int>0": "an integer > 0", "int>=0": "an integer >= 0",
              ">0": "a number > 0", ">=0": "a number >= 0",
              "[0,1]": "a number in [0, 1]", "(0,1)": "a number in (0, 1)",
              "ints>0": "one or more integers > 0, comma-separated",
              "ints>0*": "integers > 0, comma-separated (may be empty)"}


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, bool) and math.isfinite(float(v)))


def _check_kind(kind: str, v) -> bool:
  if kind in ("ints>0", "ints>0*"):
    if kind == "ints>0*" and (v == "" or v == () or v == []):
      return True
    items = (v.split(",") if isinstance(v, str)
             else list(v) if isinstance(v, (list, tuple)) else [v])
    try:
      vals = [int(str(x).strip()) if isinstance(x, str) else x for x in items]
    except ValueError:
      return False
    return bool(vals) and all(_is_int(x) and x > 0 for x in vals)
  if kind == "int>0":
    return _is_int(v) and v > 0
  if kind == "int>=0":
    return _is_int(v) and v >= 0
  if not _is_num(v):
    return False
  return {">0": v > 0, ">=0": v >= 0, "[0,1]": 0 <= v <= 1,
          "(0,1)": 0 < v < 1}[kind]


def validate_config(cfg, *, constraints=None, choices=None) -> None:
  """Raises one ValueError naming every impossible field value.

  `constraints` / `choices` extend GENERIC_CONSTRAINTS (see above); by
  default they are the CONSTRAINTS / CHOICES of the config module that
  `define_study_flags` loaded, if it defines them.
  """
  mod = _STUDY_CONFIG.get("module")
  rules = dict(GENERIC_CONSTRAINTS)
  rules.update(getattr(mod, "CONSTRAINTS", {}) if constraints is None
               else constraints)
  choices = getattr(mod, "CHOICES", {}) if choices is None else choices
  flat = _flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  errors = []
  for key, v in sorted(flat.items()):
    leaf = key.split(".")[-1]
    kind = rules.get(key, rules.get(leaf))
    if kind is not None and not _check_kind(kind, v):
      errors.append(f"config.{key} = {v!r}: must be {_KIND_TEXT[kind]}")
    allowed = choices.get(key, choices.get(leaf))
    if allowed is not None:
      items = ([x.strip() for x in v.split(",")] if isinstance(v, str)
               and isinstance(allowed[0], str) and "," in v
               else list(v) if isinstance(v, (list, tuple)) else [v])
      bad = [x for x in items if x not in allowed]
      if bad or not items:
        errors.append(f"config.{key} = {v!r}: "
                      f"{', '.join(map(repr, bad)) or 'empty'} not allowed; "
                      f"choose from {', '.join(map(str, allowed))}")
  if errors:
    raise ValueError("invalid config: " + "; ".join(errors) + ".")


def _load_config_module(path: str):
  spec = importlib.util.spec_from_file_location(
      "_attnjax_study_config_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def field_docs(config_path: str) -> Dict[str, str]:
  """{"field" or "sub.field": one line of meaning} from a config's comments.

  The meaning of `c.x = value  # text` is its trailing comment (with the
  comment-only lines that continue it); a field without one takes the
  comment block just above it. Written once, next to the field.
  """
  with open(config_path) as f:
    src = f.read()
  lines = src.splitlines()
  comments = {}
  for tok in tokenize.generate_tokens(io.StringIO(src).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
  docs = {}
  tree = ast.parse(src)
  for node in ast.walk(tree):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    t, parts = node.targets[0], []
    while isinstance(t, ast.Attribute):
      parts.append(t.attr)
      t = t.value
    if not (isinstance(t, ast.Name) and t.id == "c" and parts):
      continue
    key = ".".join(reversed(parts))
    if key in docs:
      continue
    end = node.end_lineno
    text = []
    if end in comments and lines[end - 1][:comments[end][0]].strip():
      col = comments[end][0]
      text.append(comments[end][1])
      ln = end + 1
      while ln in comments and not lines[ln - 1][:comments[ln][0]].strip() \
          and comments[ln][0] >= col - 2:
        text.append(comments[ln][1])
        ln += 1
    else:
      ln = node.lineno - 1
      while (ln in comments and comments[ln][0] == node.col_offset
             and not lines[ln - 1][:comments[ln][0]].strip()):
        text.insert(0, comments[ln][1])
        ln -= 1
    doc = " ".join(" ".join(x for x in text if x).split())
    if len(doc) > 110:                # one line: the first sentence, or cut
      stop = doc.find(". ", 0, 110)
      doc = doc[:stop + 1] if stop > 20 else doc[:107].rstrip() + "..."
    if doc:
      docs[key] = doc
  return docs


def describe_config(config_path: str) -> str:
  """Presets and every field (default, meaning, per-preset values) of a
  study config file, for `--helpfull`.

  A field's meaning is the comment next to it (`field_docs`), or an entry of
  the module's optional FIELD_DOCS = {"field": "meaning"} dict.
  """
  mod = _load_config_module(config_path)
  presets = list(getattr(mod, "PRESETS", ()))
  mods = list(getattr(mod, "PRESET_MODIFIERS", ()))
  default = mod.get_config()
  flat = _flatten(to_jsonable(default.to_dict()))
  per_preset = {}
  for p in presets:
    try:
      per_preset[p] = _flatten(to_jsonable(mod.get_config(p).to_dict()))
    except Exception:  # pylint: disable=broad-except
      continue
  docs = field_docs(config_path)
  docs.update(getattr(mod, "FIELD_DOCS", {}))   # optional explicit dict
  out = [f"Presets (--config={os.path.relpath(config_path)}:PRESET): "
         + (", ".join(presets) if presets else "(none listed)")
         + (f"; modifiers: ,{', ,'.join(mods)}" if mods else "")]
  out.append("Fields (--config.FIELD=VALUE; lists comma-separated), "
             "default = the default preset:")
  for key in sorted(flat):
    others = {p: v[key] for p, v in per_preset.items()
              if key in v and v[key] != flat[key]}
    line = f"  {key} = {flat[key]!r}: {docs.get(key, '')}".rstrip(": ")
    if others and key != "preset":
      line += " [" + ", ".join(f"{p}: {v!r}" for p, v in others.items()) + "]"
    out.append(line)
  return "\n".join(out)


def _comma_tuple_parser():
  """ml_collections' tuple parser, also taking `a,b` (`--config.targets=he1,he2`)."""
  from ml_collections.config_flags import tuple_parser

  class CommaTupleParser(tuple_parser.TupleParser):

    def parse(self, argument):
      if isinstance(argument, str):
        try:
          value = ast.literal_eval(argument)
        except (ValueError, SyntaxError):
          value = None
        if isinstance(value, (tuple, list)):
          return tuple(value)
        if value is not None:
          return (value,)
        items = []
        for x in argument.split(","):
          x = x.strip()
          if not x:
            continue
          try:
            items.append(ast.literal_eval(x))
          except (ValueError, SyntaxError):
            items.append(x)
        return tuple(items)
      return super().parse(argument)

  return CommaTupleParser()


_STUDY_CONFIG: Dict[str, Any] = {}


def guard_config(workdir: str, cfg, *, ignore=RESUME_SAFE_KEYS,
                 name: str = "config.json") -> bool:
  """Records the run's config in `workdir`, or refuses a different one.

  A workdir holds one run: resuming it under another config would silently
  mix two experiments in one checkpoint and one metrics file. The first
  call writes DIR/config.json; later calls compare against it and raise a
  ValueError naming every differing key (old -> new), except keys in
  `ignore` (they do not change the numbers).

  The config is validated first (`validate_config`): a refused config
  never writes the record. Returns True when this call wrote it (a new
  run): `recorded_run` removes such a record again if the run fails before
  it wrote anything, so the corrected command can use the same workdir.
  """
  validate_config(cfg)
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
    return False
  os.makedirs(workdir, exist_ok=True)
  if not is_main_process():
    return False
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(new, f, indent=1, sort_keys=True)
  os.replace(tmp, path)
  return True


def _holds_work(workdir: str, record: str) -> bool:
  for root, _, files in os.walk(workdir):
    for f in files:
      if os.path.join(root, f) != record and not f.endswith(".tmp"):
        return True
  return False


@contextlib.contextmanager
def recorded_run(workdir: str, cfg, **kw):
  """`guard_config`, undone if the run fails before writing anything.

  >>> with common.recorded_run(workdir, cfg):
  ...   results = run(cfg, workdir)
  """
  created = guard_config(workdir, cfg, **kw)
  record = os.path.join(workdir, kw.get("name", "config.json"))
  try:
    yield
  except BaseException:
    if created and not _holds_work(workdir, record):
      os.remove(record)
    raise


def define_study_flags(config_file: str, preset: str = "default") -> None:
  """Defines a study binary's `--workdir` and `--config` (path:preset) flags.

  Call it under `if __name__ == "__main__":` so that experiment modules can be
  imported side by side (tests, colabs) without duplicate-flag errors; `main`
  then reads `flags.FLAGS.workdir` and `flags.FLAGS.config`. Also sets up
  logging (`setup_logging`) once flags are parsed, before `main` runs.
  """
  from absl import flags
  from ml_collections import config_flags
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                      config_file)
  _STUDY_CONFIG["path"] = path
  _STUDY_CONFIG["module"] = _load_config_module(path)
  config_flags.register_flag_parser_for_type(tuple, _comma_tuple_parser())
  from absl import app
  app.call_after_init(setup_logging)   # every study binary, before main()
  flags.DEFINE_string("workdir", None, "Output directory.")
  config_flags.DEFINE_config_file(
      "config", f"{path}:{preset}",
      "Config file and preset (path:preset).\n" + describe_config(path))


def run_study_main(run_study, stopped=()):
  """The body of a study binary's `main`, after `define_study_flags`.

  One logging set-up (`setup_logging`); checks --workdir and the config;
  says so and returns the stored results when the workdir holds a completed
  run; else runs `run_study(config, workdir)` and writes results.json. An exception in `stopped` (a deliberate early stop, e.g.
  `stop_after_steps`) is printed and gives (None, None).
  Returns (results, path to results.json).
  """
  from absl import app, flags
  setup_logging()
  if not flags.FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  workdir = flags.FLAGS.workdir
  # Multi-process (JAX_COORDINATOR_ADDRESS, SLURM, TPU pod, ...): join the
  # run before any JAX work; a no-op on one process.
  from experiments import sharding
  sharding.maybe_initialize_distributed()
  try:
    validate_config(flags.FLAGS.config)
  except ValueError as e:             # a clean message, no traceback
    raise app.UsageError(str(e)) from None
  if os.path.exists(os.path.join(workdir, "config.json")):
    try:
      guard_config(workdir, flags.FLAGS.config)   # the same run, or refused
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    done = finished_run(workdir)
    if done is not None:
      return done, os.path.join(workdir, "results.json")
  try:
    with recorded_run(workdir, flags.FLAGS.config):
      res = run_study(flags.FLAGS.config, workdir)
  except tuple(stopped) as e:  # pylint: disable=catching-non-exception
    logging.warning("%s", e)
    print(str(e), flush=True)
    return None, None
  return res, write_results(workdir, res)
