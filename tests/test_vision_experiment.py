"""experiments/vision_classify: smoke run, kill + resume (across processes)
gives identical numbers, a different config is refused, the sweep table; the
colab runs top to bottom (slow)."""

import json
import os

import pytest

from experiments import vision_classify as vc
from experiments import vision_sweep
from experiments.configs import vision_classify as vc_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_GET_CONFIG = vc_config.get_config


def _cfg(model="vit"):
  cfg = _GET_CONFIG(model + ",smoke")
  cfg.steps = 8
  cfg.eval_every = cfg.ckpt_every = 4
  cfg.batch_size = 8
  return cfg


def test_digits_split_is_fixed_and_stratified():
  xtr, ytr, xte, yte = vc.load_digits(16, 0.2)
  assert xtr.shape[1:] == (16, 16, 1) and len(xtr) + len(xte) == 1797
  assert set(yte.tolist()) == set(range(10))
  xtr2, _, xte2, _ = vc.load_digits(16, 0.2)
  assert (xte == xte2).all()


def test_tfds_path_needs_local_dir():
  cfg = _cfg()
  cfg.dataset = "cifar10"
  with pytest.raises(ValueError, match="tfds_data_dir"):
    vc.load_data(cfg)


def test_sweep_writes_table(tmp_path):
  # vit at its smoke preset (run_sweep's smoke=True): the very training and
  # evaluation programs of the suite's other vit smoke runs (the reference
  # of tests/test_vision_mesh.py, the binary of tests/test_binaries_resume.py),
  # which the per-run compile cache (tests/conftest.py) compiles once; a nat
  # run here cost ~28 CPU-s of compiles of its own. (NAT's training step is
  # checked in tests/test_vision_models.py.)
  rows, table = vision_sweep.run_sweep(str(tmp_path), ["vit"], smoke=True)
  want = vc_config.get_config("vit,smoke")
  assert "| vit |" in table and rows["vit"]["steps"] == want.steps
  assert rows["vit"]["batch_size"] == want.batch_size
  assert os.path.exists(tmp_path / "accuracy_table.md")


@pytest.mark.slow
def test_colab_runs():
  from tests.notebook_runner import run_notebook, output_text
  nb = run_notebook(os.path.join(ROOT, "colabs", "vision_attention.ipynb"),
                    timeout=900)
  text = output_text(nb)
  assert "test accuracy" in text and "row sums" in text


def _run_subprocess(workdir, model, *extra, check=True):
  import subprocess
  import sys
  args = [sys.executable, "-m", "experiments.vision_classify",
          f"--workdir={workdir}",
          f"--config={os.path.join(ROOT, 'experiments', 'configs', 'vision_classify.py')}:{model},smoke",
          "--config.steps=8", "--config.eval_every=4", "--config.ckpt_every=4",
          "--config.batch_size=8", *extra]
  env = dict(os.environ, PYTHONHASHSEED="random")
  r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=300)
  if check:
    assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_moh_vit_same_numbers_across_processes(tmp_path):
  """Same seed, same numbers: a moh_vit run in this process, and one killed in
  a separate process and resumed in a third, end identically (MoH sows its
  load-balancing loss; evaluation used to leave it in the checkpointed
  state, so a fresh process could not resume). In between, a re-run under a
  different config is refused and leaves the run as it was.

  (This one test covers kill + resume, results/curves/metrics files and the
  config guard; they used to be three tests training the same smoke models
  seven times. tests/test_binaries_resume.py kills vit at a checkpoint
  boundary as well.)"""
  cfg = _cfg("moh_vit")
  full = vc.train(cfg, str(tmp_path / "full"))
  assert 0.0 <= full["test_accuracy"] <= 1.0
  assert full["throughput_images_per_s"] > 0
  wd = tmp_path / "killed"
  _run_subprocess(wd, "moh_vit", "--config.stop_after_steps=4")
  assert not os.path.exists(wd / "results.json")
  # Resuming under a different config is refused before any work.
  r = _run_subprocess(wd, "moh_vit", "--config.lr=0.123", check=False)
  assert r.returncode != 0
  assert "different config" in r.stderr and "lr: 0.002 -> 0.123" in r.stderr
  assert not os.path.exists(wd / "results.json")
  _run_subprocess(wd, "moh_vit")
  other = json.load(open(wd / "results.json"))
  for k in ("test_accuracy", "final_train_loss", "params"):
    assert other[k] == full[k], k
  for f in ("results.json", "curves.png", "metrics.jsonl"):
    assert os.path.exists(wd / f)
  recs = [json.loads(l) for l in open(wd / "metrics.jsonl")]
  ref = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert [r["step"] for r in recs] == [4, 8]
  assert [r["train_loss"] for r in recs] == [r["train_loss"] for r in ref]
