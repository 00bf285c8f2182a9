"""MaxViT (Tu et al. 2022): MBConv + block attention + grid attention.

As the official TF model (timm's `maxvit_*_tf_*`, which loads its weights):
conv stem (3x3/2 conv with TF "SAME" padding, BN, tanh-GELU, 3x3 conv),
four stages of MaxViT blocks; each block = pre-norm MBConv (BN pre-norm,
1x1 expand x4, BN, GELU, 3x3 depth-wise conv (stride 2 with "SAME" padding
in a stage's first block), BN, GELU, squeeze-excitation (SiLU, C/4), 1x1
projection with bias; shortcut: 2x2 average pool when strided, then a 1x1
conv only when the channels change) -> transformer block with
`attnjax.spatial.WindowAttention` (P x P block attention, relative position
bias) -> transformer block with `attnjax.spatial.GridAttention` (G x G grid).
GELU is the tanh approximation throughout (TF's MaxViT), BatchNorm eps 1e-3,
LayerNorm eps 1e-5. Head: global average pool, LayerNorm, Linear + tanh
pre-logits, Linear. Any input size: strided convs round up, block/grid
attention pad and mask internally.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.spatial import GridAttention, WindowAttention
from attnjax.models.vision._layers import (TORCH_LN_EPS, Backbone, Block,
                                           SqueezeExcite, conv, gelu_tanh)


def _bn(c, rngs):
  return nnx.BatchNorm(c, momentum=0.9, epsilon=1e-3, rngs=rngs)


def _same_conv(cin, cout, kernel, stride=1, *, groups=1, use_bias=True, rngs):
  """Conv with TF "SAME" padding (asymmetric, extra pixel at the end, when
  strided: what the official TF MaxViT and timm's padding='same' do)."""
  return nnx.Conv(cin, cout, (kernel, kernel), (stride, stride),
                  padding="SAME", feature_group_count=groups,
                  use_bias=use_bias, rngs=rngs)


class MBConv(nnx.Module):

  def __init__(self, cin, cout, stride=1, *, expansion=4, se_ratio=0.25,
               rngs: nnx.Rngs):
    mid = cout * expansion
    self.stride = stride
    # Official: pool when strided; 1x1 conv only when the channels change.
    self.shortcut = conv(cin, cout, 1, rngs=rngs) if cin != cout else None
    self.pre_norm = _bn(cin, rngs)
    self.conv1 = conv(cin, mid, 1, use_bias=False, rngs=rngs)
    self.norm1 = _bn(mid, rngs)
    self.conv2 = _same_conv(mid, mid, 3, stride, groups=mid, use_bias=False,
                            rngs=rngs)
    self.norm2 = _bn(mid, rngs)
    self.se = SqueezeExcite(mid, max(1, int(cout * se_ratio)),
                            activation=nnx.silu, rngs=rngs)
    self.conv3 = conv(mid, cout, 1, rngs=rngs)

  def __call__(self, x):
    s = x
    if self.stride > 1:
      s = nnx.avg_pool(s, (self.stride,) * 2, (self.stride,) * 2, "SAME")
    if self.shortcut is not None:
      s = self.shortcut(s)
    h = gelu_tanh(self.norm1(self.conv1(self.pre_norm(x))))
    h = gelu_tanh(self.norm2(self.conv2(h)))
    return s + self.conv3(self.se(h))


class MaxViT(Backbone):

  def __init__(self, *, img_size=224, in_chans=3, num_classes=1000,
               stem_dim=64, dims=(64, 128, 256, 512), depths=(2, 2, 5, 2),
               head_dim=32, window_size=7, grid_size=7, mlp_ratio=4.0,
               stem_stride=2, rngs: nnx.Rngs):
    del img_size
    self.num_classes = num_classes
    self.stage_channels = tuple(dims)
    self.stem = nnx.Sequential(
        _same_conv(in_chans, stem_dim, 3, stem_stride, rngs=rngs),
        _bn(stem_dim, rngs), gelu_tanh,
        _same_conv(stem_dim, stem_dim, 3, rngs=rngs))
    stages = []
    prev = stem_dim
    for i, (d, n) in enumerate(zip(dims, depths)):
      units = []
      for j in range(n):
        heads = max(1, d // head_dim)
        units.append(nnx.List([
            MBConv(prev if j == 0 else d, d, 2 if j == 0 else 1, rngs=rngs),
            Block(d, WindowAttention(d, heads, window_size, rngs=rngs),
                  mlp_ratio=mlp_ratio, activation=gelu_tanh,
                  norm_eps=TORCH_LN_EPS, rngs=rngs),
            Block(d, GridAttention(d, heads, grid_size, rngs=rngs),
                  mlp_ratio=mlp_ratio, activation=gelu_tanh,
                  norm_eps=TORCH_LN_EPS, rngs=rngs)]))
      stages.append(nnx.List(units))
      prev = d
    self.stages = nnx.List(stages)
    self.norm = nnx.LayerNorm(dims[-1], epsilon=TORCH_LN_EPS, rngs=rngs)
    self.pre_logits = nnx.Linear(dims[-1], dims[-1], rngs=rngs)
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def features(self, x):
    x = self.stem(x)
    feats = []
    for stage in self.stages:
      for mb, blk_attn, grid_attn in stage:
        x = grid_attn(blk_attn(mb(x)))
      feats.append(x)
    return feats

  def forward_features(self, x):
    return self.features(x)[-1]

  def forward_head(self, feats):
    h = jnp.tanh(self.pre_logits(self.norm(jnp.mean(feats, axis=(1, 2)))))
    return self.head(h)
