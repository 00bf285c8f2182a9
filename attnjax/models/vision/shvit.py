"""SHViT (Yun & Ro, CVPR 2024): single-head attention on a channel slice.

16x16 patchify stem (four 3x3/2 Conv-BN, ReLU), three stages with widths
`dims`, each block = residual depth-wise 3x3 Conv-BN, residual single-head
attention (stages with type 's'), residual Conv-BN FFN (ratio 2); stage
transitions = (dw conv, FFN, MBConv-style patch merging with SE, dw conv,
FFN). The attention itself is `attnjax.dot_product_attention` with one head
on the first `pdim` channels (GroupNorm(1) first; q/k width qk_dim, v width
pdim, from one Conv-BN); the untouched channels are concatenated back
before ReLU + Conv-BN projection. BatchNorm + Linear head.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.softmax import attention_weights, dot_product_attention
from attnjax.models.vision._layers import (Backbone, Block, ConvBN,
                                           SqueezeExcite)


def _make_divisible(v, d=8):
  return max(d, int(v + d / 2) // d * d)


class _Residual(nnx.Module):
  def __init__(self, m):
    self.m = m

  def __call__(self, x):
    return x + self.m(x)


class _FFN(nnx.Module):
  def __init__(self, dim, hidden, *, rngs):
    self.pw1 = ConvBN(dim, hidden, rngs=rngs)
    self.pw2 = ConvBN(hidden, dim, bn_scale_init=0.0, rngs=rngs)

  def __call__(self, x):
    return self.pw2(nnx.relu(self.pw1(x)))


class SingleHeadAttention(nnx.Module):
  """SHSA mixer: composes attnjax.dot_product_attention (1 head)."""

  def __init__(self, dim, qk_dim, pdim, *, rngs):
    self.pdim, self.qk_dim = pdim, qk_dim
    self.pre_norm = nnx.GroupNorm(pdim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.qkv = ConvBN(pdim, 2 * qk_dim + pdim, rngs=rngs)
    self.proj = ConvBN(dim, dim, bn_scale_init=0.0, rngs=rngs)

  def qkv_heads(self, x):
    b, h, w, _ = x.shape
    qkv = self.qkv(self.pre_norm(x[..., :self.pdim])).reshape(b, h * w, 1, -1)
    q, k, v = jnp.split(qkv, [self.qk_dim, 2 * self.qk_dim], axis=-1)
    return q, k, v

  def attention_map(self, x):
    q, k, _ = self.qkv_heads(x)
    return attention_weights(q, k)

  def __call__(self, x):
    b, h, w, _ = x.shape
    q, k, v = self.qkv_heads(x)
    x1 = dot_product_attention(q, k, v).reshape(b, h, w, self.pdim)
    return self.proj(nnx.relu(jnp.concatenate([x1, x[..., self.pdim:]], -1)))


class _SHBlock(Block):
  """dw conv -> [SHSA] -> FFN, all residual (no pre-norm of Block)."""

  def __init__(self, dim, qk_dim, pdim, attn, *, rngs):
    self.conv = ConvBN(dim, dim, 3, groups=dim, bn_scale_init=0.0, rngs=rngs)
    self.attn = SingleHeadAttention(dim, qk_dim, pdim, rngs=rngs) if attn else None
    self.ffn = _FFN(dim, 2 * dim, rngs=rngs)
    self.record = False

  def __call__(self, x):
    x = x + self.conv(x)
    if self.attn is not None:
      if self.record:
        self.sow(nnx.Intermediate, "attention_map", self.attn.attention_map(x))
      x = x + self.attn(x)
    return x + self.ffn(x)


class _PatchMerging(nnx.Module):
  def __init__(self, dim, out_dim, *, rngs):
    hid = 4 * dim
    self.conv1 = ConvBN(dim, hid, rngs=rngs)
    self.conv2 = ConvBN(hid, hid, 3, 2, groups=hid, rngs=rngs)
    self.se = SqueezeExcite(hid, _make_divisible(hid * 0.25), rngs=rngs)
    self.conv3 = ConvBN(hid, out_dim, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.conv3(self.se(x))


class SHViT(Backbone):

  def __init__(self, *, img_size=224, in_chans=3, num_classes=1000,
               dims=(128, 224, 320), depths=(2, 4, 5), pdims=(32, 48, 68),
               qk_dim=16, types=("i", "s", "s"), stem_strides=(2, 2, 2, 2),
               rngs: nnx.Rngs):
    del img_size
    self.num_classes = num_classes
    self.stage_channels = tuple(dims)
    c = dims[0]
    chs = [in_chans, c // 8, c // 4, c // 2, c]
    stem = []
    for i, s in enumerate(stem_strides):
      stem.append(ConvBN(chs[i], chs[i + 1], 3, s, rngs=rngs))
      if i < len(stem_strides) - 1:
        stem.append(nnx.relu)
    self.stem = nnx.Sequential(*stem)
    stages, downs = [], []
    prev = c
    for i, d in enumerate(dims):
      if prev != d:
        downs.append(nnx.Sequential(
            _Residual(ConvBN(prev, prev, 3, groups=prev, rngs=rngs)),
            _Residual(_FFN(prev, 2 * prev, rngs=rngs)),
            _PatchMerging(prev, d, rngs=rngs),
            _Residual(ConvBN(d, d, 3, groups=d, rngs=rngs)),
            _Residual(_FFN(d, 2 * d, rngs=rngs))))
      else:
        downs.append(None)
      stages.append(nnx.List([_SHBlock(d, qk_dim, pdims[i], types[i] == "s",
                                       rngs=rngs) for _ in range(depths[i])]))
      prev = d
    self.downs = nnx.List(downs)
    self.stages = nnx.List(stages)
    self.head_bn = nnx.BatchNorm(dims[-1], momentum=0.9, rngs=rngs)
    self.head = nnx.Linear(dims[-1], num_classes, rngs=rngs)

  def features(self, x):
    x = self.stem(x)
    feats = []
    for down, stage in zip(self.downs, self.stages):
      if down is not None:
        x = down(x)
      for blk in stage:
        x = blk(x)
      feats.append(x)
    return feats

  def forward_features(self, x):
    return self.features(x)[-1]

  def forward_head(self, feats):
    return self.head(self.head_bn(jnp.mean(feats, axis=(1, 2))))

  def blocks(self):
    return [b for b in super().blocks() if b.attn is not None]
