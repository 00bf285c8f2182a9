"""Parameter counts and FLOPs of the smallest official size of each model vs
the papers (224x224, 1000 classes). Params within 3%, FLOPs within 10%.

Sources (the table each number comes from) are in
attnjax/models/vision/paper.py (PAPER_STATS[name]["source"]):
  ViT-S/16   DeiT (Touvron et al. 2021) Table 1: 22M, 4.6G
  Swin-T     Swin (Liu et al. 2021) Table 1(a): 28M, 4.5G
  NAT-Mini   NAT (Hassani et al. 2023) Table 2: 20M, 2.7G
  DiNAT-Mini DiNAT (Hassani & Shi 2022) Table 3: 20M, 2.7G
  DaViT-T    DaViT (Ding et al. 2022) Table 1: 28.3M, 4.5G
  CSWin-T    CSWin (Dong et al. 2022) Table 2: 23M, 4.3G
  Twins-SVT-S Twins (Chu et al. 2021) Table 5: 24M, 2.9G
  BiFormer-T BiFormer (Zhu et al. 2023) Table 1: 13.1M, 2.2G
  ConViT-Ti  ConViT (d'Ascoli et al. 2021) Table 1: 6M, 1G (1 sig. figure)
  SHViT-S1   SHViT (Yun & Ro 2024) Table 2: 6.3M, 241M
  MaxViT-T   MaxViT (Tu et al. 2022) Table 2: 31M, 5.6G
  CrossViT-Ti CrossViT (Chen et al. 2021) Table 2: 6.9M, 1.6G at 240x240
  LITv2-S    LITv2 (Pan et al. 2022) Table 1: 28M, 3.7G
  Agent-DeiT-T Agent Attention (Han et al. 2024), official model table:
             6.0M, 1.2G
FLOPs are multiply-adds counted from the traced jaxpr (no compilation).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.models import vision as V
from attnjax.models.vision.complexity import jaxpr_macs


@pytest.mark.parametrize("name", sorted(V.PAPER_STATS))
def test_paper_params_and_flops(name):
  ref = V.PAPER_STATS[name]
  ctor = V.model_ctor(name, V.PAPER_PRESET[name], num_classes=1000)
  params = V.count_params(ctor)
  flops = V.count_flops(ctor, ref["resolution"])
  if ref["rounded"]:     # the paper prints one significant figure
    assert round(params / 1e6) == round(ref["params"] / 1e6), (name, params)
    assert round(flops / 1e9) == round(ref["flops"] / 1e9), (name, flops)
    return
  assert abs(params / ref["params"] - 1) <= 0.03, (name, params, ref)
  assert abs(flops / ref["flops"] - 1) <= 0.10, (name, flops, ref)


def test_flop_counter_on_known_layers():
  """Linear + conv MACs by hand."""
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.c = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=rngs)
      self.d = nnx.Conv(8, 8, (3, 3), feature_group_count=8, padding="SAME",
                        rngs=rngs)
      self.l = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
      return self.l(self.d(self.c(x)).mean((1, 2)))

  macs = V.count_flops(lambda: Net(nnx.Rngs(0)), (6, 7))
  assert macs == 6 * 7 * 8 * 3 * 9 + 6 * 7 * 8 * 9 + 8 * 5
  assert V.count_params(lambda: Net(nnx.Rngs(0))) == (
      3 * 9 * 8 + 8 + 9 * 8 + 8 + 8 * 5 + 5)


def test_neighborhood_counted_by_definition():
  """NA counts prod(kernel) keys per query even though the tiled
  implementation multiplies larger blocks."""
  from attnjax.spatial import NeighborhoodAttention
  layer = lambda: NeighborhoodAttention(16, 2, 5, rngs=nnx.Rngs(0))
  macs = V.count_flops(layer, (20, 20), in_chans=16)
  lin = 400 * 16 * 48 + 400 * 16 * 16
  assert macs == lin + 400 * 2 * 25 * (8 + 8)
