"""Four-stage hierarchical backbones that differ only in their token mixer
and stem: DaViT (window + channel attention), CSWin (cross-shaped windows),
Twins-SVT (LSA + GSA with a PEG), BiFormer (bi-level routing attention).

All mixers are layers of `attnjax.spatial`; this file only wires stems,
blocks, downsamplers and heads as the papers do:

* DaViT (Ding et al. 2022): 7x7/4 conv stem + LN; each depth unit is a
  spatial (window, no bias table) block then a channel-group block; conv
  position encodings (3x3 depth-wise, residual) before attention and MLP;
  LN + 2x2/2 conv downsampling; head = average pool -> LN -> Linear (no
  norm on the last map, as the official model).
* CSWin (Dong et al. 2022): 7x7/4 conv stem (padding 2) + LN; stripes of
  width (1, 2, 7, 7); the last stage is one full-attention branch; 3x3/2
  conv + LN merging.
* Twins-SVT (Chu et al. 2021): 4x4/4 then 2x2/2 conv patch embeddings + LN;
  blocks alternate LSA (7x7 windows) and GSA (sub-sampled keys, ratios
  8, 4, 2, 1); a 3x3 depth-wise PEG after each stage's first block.
* BiFormer (Zhu et al. 2023): two 3x3/2 conv + BN stem, 3x3/2 conv + BN
  downsampling, 3x3 depth-wise position conv before every block, BRA with
  7x7 regions and top-k (1, 4, 16) and full attention (one region) in the
  last stage, BatchNorm before pooling.
Any input size: convs pad; the spatial primitives pad windows/regions.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import nnx

from attnjax.spatial import (BiLevelRoutingAttention, ChannelAttention,
                             CSWinAttention, GlobalSubsampledAttention,
                             LocallyGroupedAttention, WindowAttention)
from attnjax.models.vision._layers import (TORCH_LN_EPS, Backbone, Block,
                                           stage_features,
                                           ClassifierHead, conv, gelu_exact,
                                           pad_to_multiple)


class _LNConv(nnx.Module):
  """[LN ->] conv(k, stride) [-> LN | BN]; PyTorch padding `pad`."""

  def __init__(self, cin, cout, k, s, pad, *, pre_ln=False, post="ln",
               rngs):
    # torch.nn.LayerNorm's eps in every official stem / downsampler.
    self.pre = (nnx.LayerNorm(cin, epsilon=TORCH_LN_EPS, rngs=rngs) if pre_ln
                else None)
    self.conv = nnx.Conv(cin, cout, (k, k), (s, s),
                         padding=[(pad, pad), (pad, pad)], rngs=rngs)
    self.stride = s
    self.k = k
    if post == "ln":
      self.post = nnx.LayerNorm(cout, epsilon=TORCH_LN_EPS, rngs=rngs)
    elif post == "bn":
      self.post = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    else:
      self.post = None

  def __call__(self, x):
    if self.pre is not None:
      x = self.pre(x)
    if self.k == self.stride:           # non-overlapping: pad odd sizes
      x = pad_to_multiple(x, self.stride)
    x = self.conv(x)
    return self.post(x) if self.post is not None else x


class Hierarchical(Backbone):
  """Generic 4-stage backbone; `family` picks stem, mixers and head."""

  def __init__(self, *, family: str, img_size=224, in_chans=3,
               num_classes=1000, dims: Sequence[int] = (64, 128, 256, 512),
               depths: Sequence[int] = (2, 2, 6, 2),
               num_heads: Sequence[int] = (2, 4, 8, 16), mlp_ratio=4.0,
               window_size=7, stripes=(1, 2, 7, 7), sr_ratios=(8, 4, 2, 1),
               num_regions=7, topks=(1, 4, 16, -1), stem_div=4,
               rngs: nnx.Rngs):
    del img_size
    self.family = family
    self.num_classes = num_classes
    self.stage_channels = tuple(dims)
    ns = len(dims)
    mk = dict(rngs=rngs)
    # stem + downsamplers
    if family == "davit":
      self.stem = _LNConv(in_chans, dims[0], 7, stem_div, 3, **mk)
      downs = [_LNConv(dims[i], dims[i + 1], 2, 2, 0, pre_ln=True, post=None,
                       **mk) for i in range(ns - 1)]
    elif family == "cswin":
      self.stem = _LNConv(in_chans, dims[0], 7, stem_div, 2, **mk)
      downs = [_LNConv(dims[i], dims[i + 1], 3, 2, 1, **mk)
               for i in range(ns - 1)]
    elif family == "twins":
      self.stem = _LNConv(in_chans, dims[0], stem_div, stem_div, 0, **mk)
      downs = [_LNConv(dims[i], dims[i + 1], 2, 2, 0, **mk)
               for i in range(ns - 1)]
    elif family == "biformer":
      self.stem = nnx.Sequential(
          conv(in_chans, dims[0] // 2, 3, 2, **mk),
          nnx.BatchNorm(dims[0] // 2, momentum=0.9, **mk), gelu_exact,
          conv(dims[0] // 2, dims[0], 3, stem_div // 2, **mk),
          nnx.BatchNorm(dims[0], momentum=0.9, **mk))
      downs = [_LNConv(dims[i], dims[i + 1], 3, 2, 1, post="bn", **mk)
               for i in range(ns - 1)]
    else:
      raise ValueError(f"unknown family {family!r}.")
    self.downs = nnx.List(downs + [None])
    stages, pegs = [], []
    for i in range(ns):
      d, n = dims[i], num_heads[i]
      blocks = []
      if family == "davit":
        for _ in range(depths[i]):
          blocks.append(Block(d, WindowAttention(d, n, window_size,
                                                 use_rpb=False, **mk),
                              mlp_ratio=mlp_ratio, pos_conv=3, pos_conv_mlp=3,
                              **mk))
          blocks.append(Block(d, ChannelAttention(d, n, **mk),
                              mlp_ratio=mlp_ratio, pos_conv=3, pos_conv_mlp=3,
                              **mk))
      elif family == "cswin":
        last = i == ns - 1
        for _ in range(depths[i]):
          blocks.append(Block(d, CSWinAttention(d, n, stripes[i],
                                                last_stage=last, **mk),
                              mlp_ratio=mlp_ratio, **mk))
      elif family == "twins":
        for j in range(depths[i]):
          mixer = (LocallyGroupedAttention(d, n, window_size, **mk)
                   if j % 2 == 0 else
                   GlobalSubsampledAttention(d, n, sr_ratios[i], **mk))
          if getattr(mixer, "norm", None) is not None:
            mixer.norm.epsilon = TORCH_LN_EPS   # Twins' GSA nn.LayerNorm
          blocks.append(Block(d, mixer, mlp_ratio=mlp_ratio, norm_eps=1e-6,
                              **mk))
      elif family == "biformer":
        full = topks[i] < 0
        for _ in range(depths[i]):
          mixer = BiLevelRoutingAttention(
              d, n, 1 if full else num_regions, 1 if full else topks[i],
              qk_scale=None, **mk)
          blocks.append(Block(d, mixer, mlp_ratio=mlp_ratio, norm_eps=1e-6,
                              pos_conv=3, **mk))
      stages.append(nnx.List(blocks))
      pegs.append(conv(d, d, 3, groups=d, **mk) if family == "twins" else None)
    self.stages = nnx.List(stages)
    self.pegs = nnx.List(pegs)
    if family == "biformer":
      self.norm = nnx.BatchNorm(dims[-1], momentum=0.9, **mk)
    elif family == "davit":
      self.norm = None                  # DaViT normalises after pooling
    else:
      self.norm = nnx.LayerNorm(dims[-1], epsilon=1e-6 if family == "twins"
                                else 1e-5, **mk)
    self.head = ClassifierHead(dims[-1], num_classes,
                               norm=family == "davit", **mk)

  def features(self, x):
    x = self.stem(x)
    return stage_features(x, self.stages, self.downs, self.norm, self.pegs)

  def forward_features(self, x):
    return self.features(x)[-1]
