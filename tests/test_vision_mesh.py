"""vision_classify with --config.mesh: data parallel on 4 forced host devices.

The 4-device run is a subprocess whose environment alone sets
XLA_FLAGS=--xla_force_host_platform_device_count=4 (jax reads it once, at
backend initialization), so the forced devices never reach this process; the
single-device run happens here. Sharded reductions reorder float sums, so the
4-device numbers match the 1-device ones within a tolerance, not bit for bit.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tests.multidevice import assert_data_mesh_checked, run_forced

from experiments import vision_classify as vc
from experiments.configs.vision_classify import get_config

RTOL = 1e-4



# Runs in the 4-device subprocess: the batch-size check, then the binary
# itself on data:4 (vit smoke, batch 16), recording its jitted training step;
# that step, lowered again afterwards (a compilation-cache hit, no second
# compile), must all-reduce the gradients, i.e. the batch really is split.
_CODE = """
import sys
import jax, jax.numpy as jnp
from absl import app
from experiments import common, vision_classify as vc
from experiments.configs.vision_classify import get_config
print('devices', jax.device_count())
c = get_config('vit,smoke'); c.mesh = 'data:4'; c.batch_size = 18
try:
  vc.make_mesh(c)
except ValueError as e:
  print('ValueError:', e)
c = get_config('vit,smoke'); c.mesh = 'data:4'
print('mesh', dict(vc.make_mesh(c).shape))
calls = []
make_train_step = vc.make_train_step
def recording(*args, **kwargs):
  step = make_train_step(*args, **kwargs)
  def wrapped(model, opt, s):
    calls.append((model, opt))
    return step(model, opt, s)
  recording.steps.append(step)
  return wrapped
recording.steps = []
vc.make_train_step = recording
common.define_study_flags('vision_classify.py', preset='vit')
sys.argv = ['vision_classify', '--workdir=' + sys.argv[1],
            '--config=experiments/configs/vision_classify.py:vit,smoke',
            '--config.mesh=data:4']
try:
  app.run(vc.main)
except SystemExit as e:
  assert not e.code, e.code
model, opt = calls[-1]
hlo = recording.steps[-1].lower(model, opt, jnp.int32(0)).compile().as_text()
print('all-reduce' in hlo and 'all-reduce', flush=True)
"""


def _metrics(d):
  with open(os.path.join(d, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def test_data4_matches_one_device_and_batch_is_sharded(tmp_path):
  assert "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", "")
  # Single-device reference (default mesh "data:1").
  cfg = get_config("vit,smoke")
  assert cfg.mesh == "data:1" and cfg.batch_size % 4 == 0
  ref = vc.train(cfg, str(tmp_path / "ref"))

  d4 = tmp_path / "d4"
  lines = run_forced("-c", _CODE, str(d4), devices=4)
  assert "devices 4" in lines, lines
  assert_data_mesh_checked(lines)
  assert any(l.startswith("vit: test_accuracy=") for l in lines), lines

  with open(d4 / "results.json") as f:
    res4 = json.load(f)
  for k in ("model", "preset", "steps", "batch_size", "params", "num_train",
            "num_test"):
    assert res4[k] == ref[k], k
  np.testing.assert_allclose(res4["final_train_loss"],
                             ref["final_train_loss"], rtol=RTOL)
  # Test accuracy: a float-order difference may at most flip one image.
  assert abs(res4["test_accuracy"] - ref["test_accuracy"]) <= (
      1.0 / ref["num_test"] + 1e-12)
  # Training curve: every logged step's loss, batch and test accuracy.
  m4, m1 = _metrics(d4), _metrics(tmp_path / "ref")
  assert [r["step"] for r in m4] == [r["step"] for r in m1] == [10, 20]
  np.testing.assert_allclose([r["train_loss"] for r in m4],
                             [r["train_loss"] for r in m1], rtol=RTOL)
  np.testing.assert_allclose([r["train_acc"] for r in m4],
                             [r["train_acc"] for r in m1], atol=1e-6)
  np.testing.assert_allclose([r["test_acc"] for r in m4],
                             [r["test_acc"] for r in m1],
                             atol=1.0 / ref["num_test"] + 1e-12)
