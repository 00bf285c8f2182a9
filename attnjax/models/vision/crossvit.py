"""CrossViT (Chen et al. 2021): two-branch ViT with CLS cross-attention fusion.

A small-patch branch (patch `patch_sizes[0]` on the input) and a large-patch
branch (patch `patch_sizes[1]` on the input resized by
`branch_scale` = 224/240, as CrossViT feeds 240 and 224 pixels); each
multi-scale block runs `depths[0]` / `depths[1]` `attnjax.MultiHeadAttention`
blocks per branch, then every branch's CLS token attends to the other
branch's patch tokens through `attnjax.spatial.CrossViTFusion`. Each
branch has its own cls token, position embedding (bicubically resized for
other inputs), final LayerNorm and head; the logits are averaged.

As the official model (timm's `crossvit_*`): LayerNorm eps 1e-6, exact GELU
(also in the fusion's projections), qkv biases, and the large branch's input
resized with PyTorch's bicubic interpolation (`torch_bicubic_resize`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.spatial import CrossViTFusion
from attnjax.models.vision._layers import (Backbone, Block, gelu_exact,
                                           pad_to_multiple, resize_pos_embed,
                                           torch_bicubic_resize, trunc02)


class _Fusion(CrossViTFusion):
  """`attnjax.spatial.CrossViTFusion` with the official exact GELU in its
  project / revert steps (the layer itself hard-codes flax's tanh GELU)."""

  def __call__(self, tokens_a, tokens_b):
    cls = tokens_a[:, :1]
    if not self.same:
      cls = self.proj(gelu_exact(self.proj_norm(cls)))
    x = jnp.concatenate([cls, tokens_b[:, 1:]], axis=1)
    cls = cls + self.attn(self.norm(x))
    if not self.same:
      cls = self.revert(gelu_exact(self.revert_norm(cls)))
    return jnp.concatenate([cls, tokens_a[:, 1:]], axis=1)


class CrossViT(Backbone):

  def __init__(self, *, img_size=240, in_chans=3, num_classes=1000,
               patch_sizes=(12, 16), dims=(96, 192), depths=(1, 4),
               num_multiscale=3, num_heads=(3, 3), mlp_ratio=4.0,
               branch_scale=224 / 240, rngs: nnx.Rngs):
    self.num_classes = num_classes
    self.stage_channels = tuple(dims)
    self.patch_sizes = tuple(patch_sizes)
    self.branch_scale = (1.0, branch_scale)
    self.img_size = img_size
    self.grids = tuple(int(round(img_size * s)) // p for s, p in
                       zip(self.branch_scale, self.patch_sizes))
    self.patch_embed = nnx.List([
        nnx.Conv(in_chans, d, (p, p), (p, p), padding="VALID", rngs=rngs)
        for d, p in zip(dims, patch_sizes)])
    self.cls_token = nnx.List([nnx.Param(trunc02(rngs.params(), (1, 1, d)))
                               for d in dims])
    self.pos_embed = nnx.List([
        nnx.Param(trunc02(rngs.params(), (1, 1 + g * g, d)))
        for d, g in zip(dims, self.grids)])
    ms = []
    for _ in range(num_multiscale):
      branches = nnx.List([
          nnx.List([Block(d, MultiHeadAttention(n, d, rngs=rngs),
                          mlp_ratio=mlp_ratio, norm_eps=1e-6, rngs=rngs)
                    for _ in range(depth)])
          for d, n, depth in zip(dims, num_heads, depths)])
      fusion = nnx.List([
          _Fusion(dims[0], dims[1], num_heads[1], rngs=rngs),
          _Fusion(dims[1], dims[0], num_heads[0], rngs=rngs)])
      ms.append(nnx.List([branches, fusion]))
    self.multiscale = nnx.List(ms)
    self.norms = nnx.List([nnx.LayerNorm(d, epsilon=1e-6, rngs=rngs)
                           for d in dims])
    self.heads = nnx.List([nnx.Linear(d, num_classes, rngs=rngs)
                           for d in dims])

  def _embed(self, x, i):
    if self.branch_scale[i] != 1.0:
      b, h, w, c = x.shape
      x = torch_bicubic_resize(x, (int(round(h * self.branch_scale[i])),
                                   int(round(w * self.branch_scale[i]))))
    x = self.patch_embed[i](pad_to_multiple(x, self.patch_sizes[i]))
    b, gh, gw, c = x.shape
    pos = self.pos_embed[i][...]
    g = self.grids[i]
    pos = jnp.concatenate(
        [pos[:, :1], resize_pos_embed(pos[:, 1:], (g, g), (gh, gw))], 1)
    cls = jnp.broadcast_to(self.cls_token[i][...], (b, 1, c))
    return jnp.concatenate([cls, x.reshape(b, gh * gw, c)], 1) + pos, (gh, gw)

  def _run(self, x):
    toks, grids = zip(*[self._embed(x, i) for i in range(2)])
    toks = list(toks)
    for branches, fusion in self.multiscale:
      for i in range(2):
        for blk in branches[i]:
          toks[i] = blk(toks[i])
      toks = [fusion[0](toks[0], toks[1]), fusion[1](toks[1], toks[0])]
    return [n(t) for n, t in zip(self.norms, toks)], grids

  def features(self, x):
    toks, grids = self._run(x)
    return [t[:, 1:].reshape(t.shape[0], g[0], g[1], t.shape[-1])
            for t, g in zip(toks, grids)]

  def forward_features(self, x):
    """Both branches' cls tokens, concatenated [B, dims[0] + dims[1]]."""
    toks, _ = self._run(x)
    return jnp.concatenate([t[:, 0] for t in toks], -1)

  def forward_head(self, feats):
    d0 = self.stage_channels[0]
    return 0.5 * (self.heads[0](feats[:, :d0]) + self.heads[1](feats[:, d0:]))
