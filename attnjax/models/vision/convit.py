"""ConViT (d'Ascoli et al. 2021): gated positional self-attention.

A DeiT whose first `local_layers` blocks use `attnjax.spatial.GPSA` on the
patch map (no cls token, convolutional initialisation of the positional
heads), after which the cls token is inserted and the remaining blocks use
`attnjax.MultiHeadAttention` (no qkv bias, as ConViT). Learned absolute
position embeddings for the training grid, bicubically resized for other
inputs (inputs not divisible by the patch are zero-padded).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.spatial import GPSA
from attnjax.models.vision._layers import (Backbone, Block, ClassifierHead,
                                           pad_to_multiple, resize_pos_embed,
                                           trunc02)


class ConViT(Backbone):

  def __init__(self, *, img_size=224, patch_size=16, in_chans=3,
               num_classes=1000, embed_dim=192, depth=12, num_heads=4,
               local_layers=10, locality_strength=1.0, mlp_ratio=4.0,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.grid = (img_size // patch_size,) * 2
    self.num_classes = num_classes
    self.stage_channels = (embed_dim,)
    self.local_layers = local_layers
    self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size,) * 2,
                                (patch_size,) * 2, padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(trunc02(rngs.params(), (1, 1, embed_dim)))
    self.pos_embed = nnx.Param(trunc02(
        rngs.params(), (1, self.grid[0] * self.grid[1], embed_dim)))
    blocks = []
    for i in range(depth):
      mixer = (GPSA(embed_dim, num_heads, locality_strength=locality_strength,
                    rngs=rngs) if i < local_layers else
               MultiHeadAttention(num_heads, embed_dim, use_bias=False,
                                  use_out_bias=True, rngs=rngs))
      blocks.append(Block(embed_dim, mixer, mlp_ratio=mlp_ratio,
                          norm_eps=1e-6, rngs=rngs))
    self.blocks_ = nnx.List(blocks)
    self.norm = nnx.LayerNorm(embed_dim, epsilon=1e-6, rngs=rngs)
    self.head = ClassifierHead(embed_dim, num_classes, rngs=rngs)

  def _run(self, x):
    x = self.patch_embed(pad_to_multiple(x, self.patch_size))
    b, gh, gw, c = x.shape
    pos = resize_pos_embed(self.pos_embed[...], self.grid, (gh, gw))
    x = x + pos.reshape(1, gh, gw, c)
    fmap = None
    for i, blk in enumerate(self.blocks_):
      if i == self.local_layers:
        fmap = x
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, c))
        x = jnp.concatenate([cls, x.reshape(b, gh * gw, c)], 1)
      x = blk(x)
    if x.ndim == 4:                      # all blocks local
      fmap = x
      x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, c)),
                           x.reshape(b, gh * gw, c)], 1)
    else:
      fmap = x[:, 1:].reshape(b, gh, gw, c)
    return self.norm(x), self.norm(fmap)

  def features(self, x):
    return [self._run(x)[1]]

  def forward_features(self, x):
    return self._run(x)[0][:, 0]
