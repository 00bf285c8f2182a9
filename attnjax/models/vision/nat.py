"""NAT (Hassani et al. 2023) and DiNAT (Hassani & Shi 2022).

Overlapping conv tokenizer (two 3x3 stride-2 convs + LayerNorm), stages of
`attnjax.spatial.NeighborhoodAttention` blocks (DiNAT alternates dilation 1
with a per-stage dilation), 3x3 stride-2 conv downsamplers + LayerNorm.
Any input size: convs pad, and the NA layer shrinks dilation/kernel on maps
smaller than kernel * dilation.
"""

from __future__ import annotations

from typing import Optional, Sequence

from flax import nnx

from attnjax.spatial import NeighborhoodAttention
from attnjax.models.vision._layers import (TORCH_LN_EPS, Backbone, Block,
                                           stage_features,
                                           ClassifierHead, conv)


class NAT(Backbone):
  """`dilations[i][j]`: dilation of block j of stage i (None: all 1 = NAT)."""

  def __init__(self, *, img_size=224, in_chans=3, num_classes=1000,
               embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16),
               kernel_size=7, mlp_ratio=3.0,
               dilations: Optional[Sequence[Sequence[int]]] = None,
               rngs: nnx.Rngs):
    del img_size
    self.num_classes = num_classes
    dims = [embed_dim * 2 ** i for i in range(len(depths))]
    self.stage_channels = tuple(dims)
    self.tok1 = conv(in_chans, embed_dim // 2, 3, 2, rngs=rngs)
    self.tok2 = conv(embed_dim // 2, embed_dim, 3, 2, rngs=rngs)
    self.tok_norm = nnx.LayerNorm(embed_dim, epsilon=TORCH_LN_EPS, rngs=rngs)
    stages, downs = [], []
    for i, (d, n) in enumerate(zip(depths, num_heads)):
      dil = [1] * d if dilations is None else list(dilations[i])
      stages.append(nnx.List([
          Block(dims[i], NeighborhoodAttention(dims[i], n, kernel_size,
                                               dilation=dil[j], rngs=rngs),
                mlp_ratio=mlp_ratio, rngs=rngs) for j in range(d)]))
      if i + 1 < len(depths):
        downs.append(nnx.Sequential(
            conv(dims[i], dims[i + 1], 3, 2, use_bias=False, rngs=rngs),
            nnx.LayerNorm(dims[i + 1], epsilon=TORCH_LN_EPS, rngs=rngs)))
      else:
        downs.append(None)
    self.stages = nnx.List(stages)
    self.downs = nnx.List(downs)
    self.norm = nnx.LayerNorm(dims[-1], epsilon=TORCH_LN_EPS, rngs=rngs)
    self.head = ClassifierHead(dims[-1], num_classes, rngs=rngs)

  def features(self, x):
    x = self.tok_norm(self.tok2(self.tok1(x)))
    return stage_features(x, self.stages, self.downs, self.norm)

  def forward_features(self, x):
    return self.features(x)[-1]
