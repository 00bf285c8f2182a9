"""experiments.common.guard_config: one workdir, one config."""

import json

import ml_collections
import pytest

from experiments import common


def _cfg(**over):
  c = ml_collections.ConfigDict()
  c.lr = 1e-3
  c.model = ml_collections.ConfigDict({"heads": 2, "width": 16})
  c.stop_after_steps = 0
  c.mesh = "data:1"
  for k, v in over.items():
    c[k] = v
  return c


def test_records_then_accepts_same_and_resume_safe_changes(tmp_path):
  common.guard_config(str(tmp_path), _cfg())
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["lr"] == 1e-3 and saved["model.heads"] == 2
  common.guard_config(str(tmp_path), _cfg())
  # Stopping point and mesh do not change a run's numbers.
  common.guard_config(str(tmp_path), _cfg(stop_after_steps=50,
                                          mesh="data:4"))


def test_refuses_a_different_config_naming_the_keys(tmp_path):
  common.guard_config(str(tmp_path), _cfg())
  c = _cfg(lr=3e-3)
  c.model.heads = 4
  with pytest.raises(ValueError) as e:
    common.guard_config(str(tmp_path), c)
  msg = str(e.value)
  assert "lr: 0.001 -> 0.003" in msg and "model.heads: 2 -> 4" in msg
  assert "width" not in msg and str(tmp_path) in msg
  # New keys count as differences too.
  c = _cfg()
  c.extra = 1
  with pytest.raises(ValueError, match="extra: '<absent>' -> 1"):
    common.guard_config(str(tmp_path), c)
  # The record is not overwritten by a refused config.
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-3


# --- config mechanism: presets, validation, docs, comma overrides ----------

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(
    ROOT, "experiments", "configs", "*.py")) if not p.endswith("__init__.py"))


def test_parse_preset_refuses_unknown_names_listing_the_allowed_ones():
  assert common.parse_preset("vit,smoke", ("vit", "swin"),
                             modifiers=("smoke",)) == ("vit", ("smoke",))
  assert common.parse_preset("", ("default", "tiny")) == ("default", ())
  with pytest.raises(ValueError, match=r"'smoek'.*allowed after the preset: "
                                       r"smoke"):
    common.parse_preset("vit,smoek", ("vit", "swin"), modifiers=("smoke",))
  with pytest.raises(ValueError, match=r"unknown preset 'vti': choose one of "
                                       r"vit, swin"):
    common.parse_preset("vti", ("vit", "swin"))
  with pytest.raises(ValueError, match="allowed after the preset: none"):
    common.parse_preset("tiny,fast", ("default", "tiny"))


def test_vision_config_refuses_a_misspelt_modifier():
  from experiments.configs import vision_classify as vcfg
  assert vcfg.get_config("vit,smoke").steps == 20
  with pytest.raises(ValueError, match="smoek"):
    vcfg.get_config("vit,smoek")
  with pytest.raises(ValueError, match="choose one of .*swin"):
    vcfg.get_config("vitt")


def _presets(mod):
  return list(getattr(mod, "PRESETS", ())) or ["default"]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_preset_of_every_study_config_is_valid_and_listed(path):
  mod = common._load_config_module(path)
  assert getattr(mod, "PRESETS", None), f"{path}: no PRESETS tuple"
  for p in _presets(mod):
    common.validate_config(mod.get_config(p),
                           constraints=getattr(mod, "CONSTRAINTS", {}),
                           choices=getattr(mod, "CHOICES", {}))
  text = common.describe_config(path)
  flat = common._flatten(common.to_jsonable(mod.get_config().to_dict()))
  for key, v in flat.items():
    assert f"  {key} = {v!r}" in text, key
  for p in _presets(mod):
    assert p in text.splitlines()[0]


def test_impossible_values_are_refused_naming_field_and_allowed_values():
  c = _cfg(steps=-10, batch_size=0, heads="2,0", lr=0.0, seed=1)
  c.model.heads = 0
  with pytest.raises(ValueError) as e:
    common.validate_config(c, constraints={}, choices={"mesh": ("data:1",)})
  msg = str(e.value)
  for part in ("config.steps = -10: must be an integer > 0",
               "config.batch_size = 0: must be an integer > 0",
               "config.heads = '2,0': must be one or more integers > 0",
               "config.lr = 0.0: must be a number > 0",
               "config.model.heads = 0: must be one or more integers > 0"):
    assert part in msg, (part, msg)
  assert "seed" not in msg and "width" not in msg
  c = _cfg(mesh="data:2")
  with pytest.raises(ValueError, match="'data:2' not allowed; choose from "
                                       "data:1"):
    common.validate_config(c, constraints={}, choices={"mesh": ("data:1",)})
  common.validate_config(_cfg(), constraints={}, choices={})
  # Per-config constraints override the generic ones.
  common.validate_config(_cfg(steps=0), constraints={"steps": "int>=0"},
                         choices={})


def test_guard_config_validates_before_recording(tmp_path):
  bad = _cfg(steps=-10)
  with pytest.raises(ValueError, match="config.steps = -10"):
    common.guard_config(str(tmp_path), bad)
  assert not (tmp_path / "config.json").exists()
  # The corrected command then owns the workdir.
  assert common.guard_config(str(tmp_path), _cfg(steps=10)) is True
  assert common.guard_config(str(tmp_path), _cfg(steps=10)) is False


def test_recorded_run_records_only_a_run_that_started(tmp_path):
  wd = str(tmp_path / "a")
  with pytest.raises(RuntimeError):
    with common.recorded_run(wd, _cfg(steps=5)):
      raise RuntimeError("failed before writing anything (e.g. a bad mesh)")
  assert not os.path.exists(os.path.join(wd, "config.json"))
  common.guard_config(wd, _cfg(steps=7))            # another config is fine
  wd = str(tmp_path / "b")
  with pytest.raises(RuntimeError):
    with common.recorded_run(wd, _cfg(steps=5)):
      common.MetricsWriter(wd).write(1, loss=1.0)
      raise RuntimeError("killed after some work")
  assert os.path.exists(os.path.join(wd, "config.json"))  # resumable record
  with pytest.raises(ValueError, match="steps: 5 -> 7"):
    common.guard_config(wd, _cfg(steps=7))


def test_field_docs_come_from_the_comments_next_to_the_fields(tmp_path):
  p = tmp_path / "cfg.py"
  p.write_text(
      "import ml_collections\n"
      "PRESETS = ('default', 'big')\n"
      "def get_config(preset='default'):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.steps = 10        # training steps\n"
      "                      # (continued)\n"
      "  # Devices: a mesh string.\n"
      "  c.mesh = 'data:1'\n"
      "  c.sub = ml_collections.ConfigDict()\n"
      "  c.sub.lr = 0.1      # sub learning rate\n"
      "  c.undocumented = 3\n"
      "  if preset == 'big':\n"
      "    c.steps = 99      # not the doc\n"
      "  return c\n")
  assert common.field_docs(str(p)) == {
      "steps": "training steps (continued)", "mesh": "Devices: a mesh string.",
      "sub.lr": "sub learning rate"}
  text = common.describe_config(str(p))
  assert "default, big" in text.splitlines()[0]
  assert "  steps = 10: training steps (continued) [big: 99]" in text
  assert "  sub.lr = 0.1: sub learning rate" in text
  assert "  undocumented = 3" in text


def _parse_config_flags(config_file, preset, override):
  from absl import flags
  from ml_collections import config_flags
  config_flags.register_flag_parser_for_type(tuple,
                                             common._comma_tuple_parser())
  fv = flags.FlagValues()
  argv = ["prog", f"--config={config_file}:{preset}", override]
  config_flags.DEFINE_config_file("config", f"{config_file}:{preset}",
                                  flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def _list_fields(cfg):
  flat = common._flatten(cfg.to_dict())
  return {k: v for k, v in flat.items()
          if isinstance(v, (tuple, list)) or (
              isinstance(v, str) and "," in v)}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_comma_separated_overrides_work_for_every_list_field(path):
  mod = common._load_config_module(path)
  fields = _list_fields(mod.get_config(_presets(mod)[0]))
  for key, v in fields.items():
    items = (list(v) if isinstance(v, (tuple, list)) else v.split(","))[:2]
    arg = ",".join(str(x) for x in items)
    got = _parse_config_flags(path, _presets(mod)[0], f"--config.{key}={arg}")
    for part in key.split("."):
      got = got[part]
    want = tuple(items) if isinstance(v, (tuple, list)) else arg
    assert got == want, (key, got, want)


def test_comma_tuple_parser_keeps_python_literals():
  parse = common._comma_tuple_parser().parse
  assert parse("he1,he2") == ("he1", "he2")
  assert parse("32,64") == (32, 64)
  assert parse("('a', 'b')") == ("a", "b")
  assert parse("he3") == ("he3",)
  assert parse("1e-3,1.0") == (1e-3, 1.0)


# --- kills at every phase boundary of a sweep (experiments/sweep.py) --------

def _cells():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from experiments import sweep
  w_true = jnp.array([[1.5], [-2.0]])

  def batch_fn(key):
    x = jax.random.normal(key, (8, 2))
    return x, x @ w_true

  def loss_fn(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)

  xe = jax.random.normal(jax.random.key(99), (64, 2))

  def eval_fn(model):
    return {"mse": jnp.mean((model(xe) - xe @ w_true) ** 2)}

  return [sweep.Cell(name=f"c{i}", seed=i, steps=20, lr=0.05,
                     make_model=lambda i=i: nnx.Linear(2, 1,
                                                       rngs=nnx.Rngs(i)),
                     loss_fn=loss_fn, batch_fn=batch_fn, eval_fn=eval_fn,
                     info={"i": i})
          for i in range(2)]


def _train(wd, **kw):
  from experiments import sweep
  res = sweep.train_cells(str(wd), _cells(), chunk=5, ckpt_every=10, **kw)
  return {c: {k: v for k, v in r.items() if k != "train_time_s"}
          for c, r in res.items()}


def test_sweep_resumes_identically_after_a_kill_at_every_phase_boundary(
    tmp_path, monkeypatch, capsys):
  from experiments import sweep
  want = _train(tmp_path / "ref")
  # checkpoint:2 / :4 are each cell's final checkpoint (the cell killed
  # before its result file: UnboundLocalError 'loss' on re-run, before).
  stops = ["checkpoint:2", "checkpoint:3", "eval:1", "cell:1"]
  for spec in stops:
    wd = tmp_path / spec.replace(":", "_")
    monkeypatch.setenv(common.STOP_ENV, spec)
    common.reset_phases()
    with pytest.raises(common.PhaseStop, match=spec.split(":")[0]):
      _train(wd)
    monkeypatch.delenv(common.STOP_ENV)
    capsys.readouterr()
    assert _train(wd) == want, spec
    out = capsys.readouterr().out
    if spec == "checkpoint:3":       # cell c1 killed after its step-10 save
      assert "[train] 1 of 2 cells already finished" in out
      assert "resumed from cell c1 step 10 of 20" in out
      assert "[train c1 [2/2]] 20/20 (100.0%)" in out
  # A finished workdir re-runs to the same numbers without training.
  assert _train(wd) == want
  # The repro: stop_after_steps equal to a cell's length stops right
  # after its final checkpoint; running the same command again finishes.
  wd = tmp_path / "stop_after"
  with pytest.raises(sweep.Stopped):
    _train(wd, stop_after_steps=20)
  with pytest.raises(sweep.Stopped):
    _train(wd, stop_after_steps=20)   # trains cell c1 (c0 only evaluated)
  assert _train(wd, stop_after_steps=20) == want


# --- benchmarks: impossible orderings and argument errors -------------------

def test_ordered_timings_retimes_then_flags_an_impossible_ordering():
  seq = iter([(2.0, 1.0), (2.0, 1.5), (1.0, 3.0)])
  assert common.ordered_timings(lambda: next(seq)) == (1.0, 3.0, False)
  calls = []

  def never():
    calls.append(1)
    return 2.0, 2.0               # fwd+bwd never slower than fwd
  assert common.ordered_timings(never, retries=3) == (2.0, 2.0, True)
  assert len(calls) == 4
  assert common.ordered_timings(lambda: (1.0, 2.0)) == (1.0, 2.0, False)


@pytest.mark.parametrize("args,message", [
    (["--methods=dense,nosuch"],
     "--methods: unknown 'nosuch'; choose from dense,ring,ring_zigzag,"
     "ring_striped,ring_contiguous,ulysses,ulysses_causal."),
    (["--devices=3"],
     "--devices: 3 cannot shard the sequence (--seq_len=2048 must be "
     "divisible by each device count); with 8 devices choose from 1,2,4,8."),
    (["--modes=fwd,back"], "--modes: unknown 'back'; choose from fwd,fwd_bwd."),
])
def test_bench_distributed_argument_errors_list_the_choices(tmp_path, args,
                                                            message):
  import subprocess
  import sys
  r = subprocess.run(
      [sys.executable, "-m", "experiments.bench_distributed",
       f"--workdir={tmp_path}", *args], cwd=ROOT, capture_output=True,
      text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode != 0
  assert message in r.stderr + r.stdout, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "results.json").exists()


# --- logging: progress, resume and completion messages ----------------------

def test_progress_eta_leaves_out_the_time_before_the_first_update(
    monkeypatch):
  import io
  clock = [100.0]
  monkeypatch.setattr(common.time, "time", lambda: clock[0])
  out = io.StringIO()
  p = common.Progress(100, every=10, desc="train", stream=out)
  clock[0] += 50.0                 # compilation before the first chunk
  p.update(10)
  clock[0] += 10.0                 # then 10 steps per 10 s
  p.update(20)
  lines = out.getvalue().splitlines()
  # The first line's rate includes compilation: no ETA claimed from it.
  assert lines[0] == "[train] 10/100 ( 10.0%) 0.2 it/s ETA ?"
  # 1 it/s from the steps after the first update: 80 steps left -> 1:20.
  assert lines[1] == "[train] 20/100 ( 20.0%) 1 it/s ETA 1:20"


def test_resume_and_completed_run_messages(tmp_path, capsys):
  common.log_resume(0, 100)
  common.log_resume(40, 100)
  assert common.finished_run(str(tmp_path)) is None
  common.write_results(str(tmp_path), {"a": 1})
  assert common.finished_run(str(tmp_path)) == {"a": 1}
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "resumed from step 40 of 100"
  assert "holds a completed run (results.json): nothing to do" in out[1]
  assert len(out) == 2


def test_field_docs_dict_of_a_config_module_is_used(tmp_path):
  p = tmp_path / "cfg2.py"
  p.write_text(
      "import ml_collections\n"
      "PRESETS = ('default',)\n"
      "FIELD_DOCS = {'steps': 'from the dict'}\n"
      "def get_config(preset='default'):\n"
      "  c = ml_collections.ConfigDict()\n"
      "  c.steps = 10\n"
      "  return c\n")
  assert "  steps = 10: from the dict" in common.describe_config(str(p))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_field_has_a_line_of_meaning_for_helpfull(path):
  # --helpfull lists each field with the comment next to it (or FIELD_DOCS).
  mod = common._load_config_module(path)
  docs = common.field_docs(path)
  docs.update(getattr(mod, "FIELD_DOCS", {}))
  flat = common._flatten(mod.get_config().to_dict())
  missing = sorted(k for k in flat if k not in docs and k != "preset")
  assert not missing, (f"{os.path.basename(path)}: fields without a comment "
                       f"(or FIELD_DOCS entry): {', '.join(missing)}")


# --- run_study_main: validation, record, completed workdirs ------------------

_FAKE_STUDY = '''
import os, sys
from absl import app, flags
from experiments import common

def run_study(cfg, workdir):
  if os.environ.get("FAKE_FAIL"):
    raise RuntimeError("failed before writing anything")
  with open(os.path.join(workdir, "calls.txt"), "a") as f:
    f.write("run\\n")
  return {"num_heads": cfg.num_heads}

def main(argv):
  res, path = common.run_study_main(run_study)
  print("results", res)

if __name__ == "__main__":
  common.define_study_flags("random_feature_attention.py", preset="tiny")
  app.run(main)
'''


def _fake(tmp_path, *args, env=None):
  import subprocess
  import sys
  script = tmp_path / "fake_study.py"
  script.write_text(_FAKE_STUDY)
  return subprocess.run(
      [sys.executable, str(script), *args], cwd=str(tmp_path),
      capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           **(env or {})})


def test_run_study_main_refuses_bad_configs_and_skips_a_completed_run(
    tmp_path):
  wd = tmp_path / "wd"
  r = _fake(tmp_path, f"--workdir={wd}", "--config.num_heads=0",
            "--config.targets=he1,he7")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "config.num_heads = 0: must be an integer > 0" in r.stderr
  assert "'he7' not allowed; choose from key_linear, he1" in r.stderr
  assert not (wd / "config.json").exists()
  # The corrected command owns the workdir; comma-separated tuple override.
  r = _fake(tmp_path, f"--workdir={wd}", "--config.num_heads=8",
            "--config.targets=he1,he2")
  assert r.returncode == 0, r.stderr
  assert "results {'num_heads': 8}" in r.stdout
  assert json.loads((wd / "config.json").read_text())["targets"] == [
      "he1", "he2"]
  # Re-running a finished workdir says so and does not recompute.
  r = _fake(tmp_path, f"--workdir={wd}", "--config.num_heads=8",
            "--config.targets=he1,he2")
  assert r.returncode == 0, r.stderr
  assert "holds a completed run (results.json): nothing to do" in r.stdout
  assert (wd / "calls.txt").read_text() == "run\n"
  assert r.stderr == ""                    # no absl INFO chatter
  # A failure before any output leaves no record behind.
  wd2 = tmp_path / "wd2"
  r = _fake(tmp_path, f"--workdir={wd2}", "--config.num_heads=8",
            env={"FAKE_FAIL": "1"})
  assert r.returncode != 0 and "failed before writing anything" in r.stderr
  assert not (wd2 / "config.json").exists()
