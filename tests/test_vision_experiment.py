"""experiments/vision_classify: smoke run, kill + resume gives identical
numbers, the sweep table; the colab runs top to bottom (slow)."""

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


def test_resume_gives_identical_results(tmp_path):
  full = vc.train(_cfg(), str(tmp_path / "full"))
  cfg = _cfg()
  cfg.stop_after_steps = 4                       # simulated kill at step 4
  assert vc.train(cfg, str(tmp_path / "killed")) is None
  assert not os.path.exists(tmp_path / "killed" / "results.json")
  resumed = vc.train(_cfg(), str(tmp_path / "killed"))
  for k in ("test_accuracy", "final_train_loss", "params"):
    assert resumed[k] == full[k], k
  for f in ("results.json", "curves.png", "metrics.jsonl"):
    assert os.path.exists(tmp_path / "killed" / f)
  steps = [json.loads(l)["step"] for l in open(tmp_path / "killed" / "metrics.jsonl")]
  assert steps == [4, 8]
  assert 0.0 <= full["test_accuracy"] <= 1.0 and full["throughput_images_per_s"] > 0


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


def test_sweep_writes_table(tmp_path, monkeypatch):
  monkeypatch.setattr(vc_config, "get_config",
                      lambda arg: _cfg(arg.split(",")[0]))
  rows, table = vision_sweep.run_sweep(str(tmp_path), ["nat"], steps=0)
  assert "| nat |" in table and rows["nat"]["steps"] == 8
  assert os.path.exists(tmp_path / "accuracy_table.md")


@pytest.mark.slow
def test_colab_runs():
  from tests.notebook_runner import run_notebook, output_text
  nb = run_notebook(os.path.join(ROOT, "colabs", "vision_attention.ipynb"),
                    timeout=900)
  text = output_text(nb)
  assert "test accuracy" in text and "row sums" in text
