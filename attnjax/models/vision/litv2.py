"""LITv2 (Pan et al., NeurIPS 2022): MLP-only early stages, HiLo attention
late, depth-wise conv in every FFN.

4x4/4 conv patch embedding + LN; stages 1-2 are MLP-only blocks, stages 3-4
use `attnjax.spatial.HiLoAttention` (alpha 0.9, window 2; window 1 in the
last stage = all heads Lo-Fi, as LITv2); FFN = fc1 -> 3x3 depth-wise conv ->
GELU -> fc2. Downsampling between stages: LITv2 uses deformable token
merging (DTM, a 2x2/2 deformable conv + its offset conv + BN + GELU); there
is no deformable convolution here, so this model uses the same 2x2/2 conv +
BN + GELU *without* the learned offsets (the offset convs: ~0.02M parameters,
<0.1% of the model, are missing; see docs/vision.md).
"""

from __future__ import annotations

from flax import nnx

from attnjax.spatial import HiLoAttention
from attnjax.models.vision._layers import (TORCH_LN_EPS, Backbone, Block,
                                           stage_features,
                                           ClassifierHead, ConvMLP, gelu_exact,
                                           pad_to_multiple)


class _Merge(nnx.Module):
  def __init__(self, cin, cout, k, *, post="ln", rngs):
    self.k = k
    self.conv = nnx.Conv(cin, cout, (k, k), (k, k), padding="VALID", rngs=rngs)
    self.post_kind = post
    self.post = (nnx.LayerNorm(cout, epsilon=TORCH_LN_EPS, rngs=rngs)
                 if post == "ln" else
                 nnx.BatchNorm(cout, momentum=0.9, rngs=rngs))

  def __call__(self, x):
    x = self.post(self.conv(pad_to_multiple(x, self.k)))
    return gelu_exact(x) if self.post_kind == "bn" else x


class LITv2(Backbone):

  def __init__(self, *, img_size=224, in_chans=3, num_classes=1000,
               patch_size=4, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2),
               num_heads=(3, 6, 12, 24), mlp_ratio=4.0, alpha=0.9,
               windows=(0, 0, 2, 1), rngs: nnx.Rngs):
    del img_size
    self.num_classes = num_classes
    self.stage_channels = tuple(dims)
    self.patch_embed = _Merge(in_chans, dims[0], patch_size, rngs=rngs)
    stages, downs = [], []
    for i, (d, n) in enumerate(zip(dims, depths)):
      blocks = []
      for _ in range(n):
        mixer = (HiLoAttention(d, num_heads[i], windows[i], alpha, rngs=rngs)
                 if windows[i] > 0 else None)
        blocks.append(Block(d, mixer, mlp=ConvMLP(d, int(d * mlp_ratio),
                                                  rngs=rngs), rngs=rngs))
      stages.append(nnx.List(blocks))
      downs.append(_Merge(d, dims[i + 1], 2, post="bn", rngs=rngs)
                   if i + 1 < len(dims) else None)
    self.stages = nnx.List(stages)
    self.downs = nnx.List(downs)
    self.norm = nnx.LayerNorm(dims[-1], epsilon=TORCH_LN_EPS, rngs=rngs)
    self.head = ClassifierHead(dims[-1], num_classes, rngs=rngs)

  def features(self, x):
    x = self.patch_embed(x)
    return stage_features(x, self.stages, self.downs, self.norm)

  def forward_features(self, x):
    return self.features(x)[-1]
