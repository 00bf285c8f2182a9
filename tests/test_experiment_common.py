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
