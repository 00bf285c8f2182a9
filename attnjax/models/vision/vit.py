"""ViT / DeiT (Dosovitskiy et al. 2021; Touvron et al. 2021) and the ViTs that
only swap the token mixer: agent-attention ViT (Han et al. 2024; `agent`:
the library's `attnjax.sequence.AgentAttention`, `agent_deit`: the official
Agent-DeiT layer with its agent biases and depth-wise conv,
`agent.AgentDeiTAttention`) and Mixture-of-Head ViT (Jin et al. 2024).

Patch embedding (conv, stride = patch), a cls token, learned position
embeddings for the training grid (bicubically resized when the input grid
differs; inputs not divisible by the patch are zero-padded), pre-norm blocks
of `attnjax.MultiHeadAttention` (or `attnjax.sequence.AgentAttention` /
`MoHAttention`), final LayerNorm, linear head on the cls token.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.sequence import AgentAttention, MoHAttention
from attnjax.models.vision._layers import (Backbone, Block, ClassifierHead,
                                           pad_to_multiple, resize_pos_embed,
                                           trunc02)
from attnjax.models.vision.agent import AgentDeiTAttention


class ViT(Backbone):
  """Vision Transformer; `mixer` in {'softmax', 'agent', 'agent_deit',
  'moh'}."""

  def __init__(self, *, img_size=224, patch_size=16, in_chans=3,
               num_classes=1000, embed_dim=384, depth=12, num_heads=6,
               mlp_ratio=4.0, mixer: str = "softmax", num_agents: int = 49,
               moh_shared_heads: int = 0, moh_active_heads: Optional[int] = None,
               rngs: nnx.Rngs):
    self.patch_size = patch_size
    self.grid = (img_size // patch_size, img_size // patch_size)
    self.num_classes = num_classes
    self.stage_channels = (embed_dim,)
    self.mixer_kind = mixer
    self.patch_embed = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size),
                                (patch_size, patch_size), padding="VALID",
                                rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, embed_dim)))
    self.pos_embed = nnx.Param(trunc02(
        rngs.params(), (1, 1 + self.grid[0] * self.grid[1], embed_dim)))

    def make_mixer():
      if mixer == "softmax":
        return MultiHeadAttention(num_heads, embed_dim, rngs=rngs)
      if mixer == "agent":
        return AgentAttention(num_heads, embed_dim, num_agents=num_agents,
                              rngs=rngs)
      if mixer == "agent_deit":
        return AgentDeiTAttention(embed_dim, num_heads, agent_num=num_agents,
                                  window=self.grid[0], rngs=rngs)
      if mixer == "moh":
        return MoHAttention(num_heads, embed_dim,
                            num_shared_heads=moh_shared_heads,
                            num_active_heads=moh_active_heads, rngs=rngs)
      raise ValueError(
          f"`mixer` must be softmax/agent/agent_deit/moh, got {mixer!r}.")

    self.blocks_ = nnx.List([Block(embed_dim, make_mixer(), mlp_ratio=mlp_ratio,
                                   norm_eps=1e-6, rngs=rngs)
                             for _ in range(depth)])
    self.norm = nnx.LayerNorm(embed_dim, epsilon=1e-6, rngs=rngs)
    self.head = ClassifierHead(embed_dim, num_classes, rngs=rngs)

  def _tokens(self, x):
    x = self.patch_embed(pad_to_multiple(x, self.patch_size))
    b, gh, gw, c = x.shape
    pos = self.pos_embed[...]
    pos = jnp.concatenate(
        [pos[:, :1], resize_pos_embed(pos[:, 1:], self.grid, (gh, gw))], 1)
    cls = jnp.broadcast_to(self.cls_token[...], (b, 1, c))
    return jnp.concatenate([cls, x.reshape(b, gh * gw, c)], 1) + pos, (gh, gw)

  def _run(self, x):
    x, grid = self._tokens(x)
    kw = {"grid": grid} if self.mixer_kind == "agent_deit" else {}
    for blk in self.blocks_:
      x = blk(x, **kw)
    return self.norm(x), grid

  def features(self, x):
    """[[B, H/p, W/p, C]]: the final patch tokens as a map (cls dropped)."""
    t, (gh, gw) = self._run(x)
    return [t[:, 1:].reshape(t.shape[0], gh, gw, t.shape[-1])]

  def forward_features(self, x):
    """The normalised cls token [B, C]."""
    return self._run(x)[0][:, 0]
