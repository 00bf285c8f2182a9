"""Swin Transformer (Liu et al. 2021): shifted-window attention, patch merging.

Stages of `attnjax.spatial.WindowAttention` blocks alternating shift 0 and
window // 2. Any input size: the patch embedding and patch merging zero-pad
odd sizes (as the official code), windows that don't divide the map are
padded inside the primitive with masked keys. `set_window_size` re-samples
every relative-position-bias table (bicubic) for a new window.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.spatial import WindowAttention
from attnjax.models.vision._layers import (TORCH_LN_EPS, Backbone, Block,
                                           stage_features,
                                           ClassifierHead, pad_to_multiple)


class PatchMerging(nnx.Module):
  """2x2 neighbourhood concat -> LayerNorm(4C) -> Linear(4C, 2C, no bias)."""

  def __init__(self, dim: int, out_dim: int, *, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(4 * dim, epsilon=TORCH_LN_EPS, rngs=rngs)
    self.reduction = nnx.Linear(4 * dim, out_dim, use_bias=False, rngs=rngs)

  def __call__(self, x):
    x = pad_to_multiple(x, 2)
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class Swin(Backbone):

  def __init__(self, *, img_size=224, patch_size=4, in_chans=3,
               num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
               num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0,
               rngs: nnx.Rngs):
    del img_size   # nothing depends on the training resolution
    self.patch_size = patch_size
    self.num_classes = num_classes
    dims = [embed_dim * 2 ** i for i in range(len(depths))]
    self.stage_channels = tuple(dims)
    self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size,) * 2,
                                (patch_size,) * 2, padding="VALID", rngs=rngs)
    self.patch_norm = nnx.LayerNorm(embed_dim, epsilon=TORCH_LN_EPS,
                                    rngs=rngs)
    stages, merges = [], []
    for i, (d, n) in enumerate(zip(depths, num_heads)):
      stages.append(nnx.List([
          Block(dims[i], WindowAttention(
              dims[i], n, window_size,
              shift_size=0 if j % 2 == 0 else window_size // 2, rngs=rngs),
                mlp_ratio=mlp_ratio, rngs=rngs) for j in range(d)]))
      merges.append(PatchMerging(dims[i], dims[i + 1], rngs=rngs)
                    if i + 1 < len(depths) else None)
    self.stages = nnx.List(stages)
    self.merges = nnx.List(merges)
    self.norm = nnx.LayerNorm(dims[-1], epsilon=TORCH_LN_EPS, rngs=rngs)
    self.head = ClassifierHead(dims[-1], num_classes, rngs=rngs)

  def set_window_size(self, window_size):
    """New window for every block (bias tables resized bicubically)."""
    for stage in self.stages:
      for blk in stage:
        blk.attn.resize_window(window_size)
        if any(blk.attn.shift_size):
          blk.attn.shift_size = tuple(w // 2 for w in blk.attn.window_size)

  def features(self, x):
    x = self.patch_norm(self.patch_embed(pad_to_multiple(x, self.patch_size)))
    return stage_features(x, self.stages, self.merges, self.norm)

  def forward_features(self, x):
    return self.features(x)[-1]
