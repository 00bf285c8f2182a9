"""benefits_of_rank with --config.mesh: data parallel on 4 forced host devices.

The 4-device run is a subprocess whose environment alone sets
XLA_FLAGS=--xla_force_host_platform_device_count=4 (jax reads it once, at
backend initialization), so the forced devices never reach this process; the
single-device run happens here. Sharded reductions reorder float sums, so the
4-device numbers match the 1-device ones within a tolerance, not bit for bit.
The sweep driver (experiments/sweep.py) is shared with low_rank_bottleneck,
whose mesh wiring differs only in which batch size is checked.
"""

from __future__ import annotations

import json
import os

import numpy as np

from tests.multidevice import assert_data_mesh_checked, run_forced

from experiments import benefits_of_rank as study
from experiments.configs.benefits_of_rank import get_config

RTOL = 1e-4



# Runs in the 4-device subprocess: the batch-size check, then the compiled
# training chunk of one cell on data:4 (must all-reduce the gradients, i.e.
# the batch really is split), then the binary itself on data:4. The chunk
# checked is the binary's own first program (first cell, the preset's chunk
# length, `rest` passed as the sweep passes it), so the binary gets it from
# the per-run compile cache instead of compiling a second training chunk.
_CODE = """
import sys
import jax
from absl import flags
from experiments import benefits_of_rank as study, sweep
from experiments.configs.benefits_of_rank import get_config
print('devices', jax.device_count())
c = get_config('tiny'); c.mesh = 'data:4'; c.batch_size = 18
try:
  study.make_mesh(c)
except ValueError as e:
  print('ValueError:', e)
c = get_config('tiny'); c.mesh = 'data:4'
mesh = study.make_mesh(c)
print('mesh', dict(mesh.shape))
b = sweep.build_cell(study.make_cells(c)[0], chunk=int(c.chunk), mesh=mesh)
hlo = b.run_chunk.lower(b.init['params'], b.init['opt'], 0,
                        b.rest).compile().as_text()
print('all-reduce' in hlo and 'all-reduce', flush=True)
sys.argv = ['benefits_of_rank', '--workdir=' + sys.argv[1],
            '--config=experiments/configs/benefits_of_rank.py:tiny',
            '--config.mesh=data:4'] + sys.argv[2:]
from experiments import common
common.define_study_flags('benefits_of_rank.py')
from absl import app
app.run(study.main)
"""


def test_data4_matches_one_device_and_batch_is_sharded(tmp_path):
  assert "xla_force_host_platform_device_count" not in os.environ.get(
      "XLA_FLAGS", "")
  # Under CI one training cell (rank 4, no N-sweep) in both runs instead
  # of 3 (each is mostly compile time).
  quick = bool(os.environ.get("CI"))
  cfg = get_config("tiny")
  extra = []
  if quick:          # one cell: the CI resume test's (cached compiles)
    cfg.ranks, cfg.fign_num_points = "4", ""
    extra = ["--config.ranks=4", "--config.fign_num_points="]
  # Single-device reference (default mesh "data:1").
  ref = study.run_study(cfg, str(tmp_path / "ref"))
  assert ref["config"]["mesh"] == "data:1"

  d4 = tmp_path / "d4"
  lines = run_forced("-c", _CODE, str(d4), *extra, devices=4)
  assert "devices 4" in lines, lines
  assert_data_mesh_checked(lines)

  with open(d4 / "results.json") as f:
    res4 = json.load(f)
  assert res4["config"]["mesh"] == "data:4"
  assert [(r["N"], r["depth"], r["rank"]) for r in res4["table"]] == [
      (r["N"], r["depth"], r["rank"]) for r in ref["table"]]
  np.testing.assert_allclose([r["mse"] for r in res4["table"]],
                             [r["mse"] for r in ref["table"]], rtol=RTOL)
  # Training curves too (every chunk's mean loss).
  def losses(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
      return [json.loads(l)["loss"] for l in f if l.strip()]
  np.testing.assert_allclose(losses(d4), losses(tmp_path / "ref"), rtol=RTOL)
  assert res4["construction_mse"] == ref["construction_mse"]
