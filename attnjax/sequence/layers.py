"""Flax NNX layers of the sequence attention family.

Mechanisms without parameters of their own are `attnjax.MultiHeadAttention`
with the primitive as `attention_fn` (same projections, GQA, `head_dim`
independent of width, masks passed as key-padding masks). Performer holds
its random projection as a non-trainable variable with `redraw(rng)`; MoH
adds a router; triple-wise attention has two key/value projections.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from attnjax.nn import MultiHeadAttention
from attnjax.sequence.agent import agent_attention
from attnjax.sequence.efficient import efficient_attention
from attnjax.sequence.higher_order import triplewise_attention
from attnjax.sequence.linear import linear_attention
from attnjax.sequence.moba import moba_attention
from attnjax.sequence.moh import mixture_of_heads_attention, moh_gates
from attnjax.sequence.performer import (orthogonal_random_features,
                                        performer_attention)
from attnjax.sequence.routing import routing_attention
from attnjax.sequence.sparse import sliding_window_attention
from attnjax.softmax import dot_product_attention


class LinearAttention(MultiHeadAttention):
  """MultiHeadAttention with `linear_attention` (feature_map, normalize,
  chunk_size, scale fixed at construction)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               feature_map="elu_plus_one", normalize: bool = True,
               chunk_size: Optional[int] = None, scale: Optional[float] = None,
               **kwargs):
    fn = functools.partial(linear_attention, feature_map=feature_map,
                           normalize=normalize, chunk_size=chunk_size,
                           scale=scale)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)


class EfficientAttention(MultiHeadAttention):
  """MultiHeadAttention with `efficient_attention` (Shen et al.)."""

  def __init__(self, num_heads: int, in_features: int, *args, **kwargs):
    super().__init__(num_heads, in_features, *args,
                     attention_fn=efficient_attention, **kwargs)


class SlidingWindowAttention(MultiHeadAttention):
  """MultiHeadAttention with `sliding_window_attention(window_size)`."""

  def __init__(self, num_heads: int, in_features: int, *args, window_size,
               block_size: Optional[int] = None, **kwargs):
    fn = functools.partial(sliding_window_attention, window_size=window_size,
                           block_size=block_size)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)


class MoBAAttention(MultiHeadAttention):
  """MultiHeadAttention with `moba_attention(block_size, top_k)`."""

  def __init__(self, num_heads: int, in_features: int, *args,
               block_size: int = 64, top_k: int = 3, **kwargs):
    fn = functools.partial(moba_attention, block_size=block_size, top_k=top_k)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)


class RoutingAttention(MultiHeadAttention):
  """MultiHeadAttention with bi-level `routing_attention` (1D BiFormer)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               region_size: int = 64, top_k: int = 4, **kwargs):
    fn = functools.partial(routing_attention, region_size=region_size,
                           top_k=top_k)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)


class AgentAttention(MultiHeadAttention):
  """MultiHeadAttention with `agent_attention(num_agents)` (agents pooled
  from the projected queries)."""

  def __init__(self, num_heads: int, in_features: int, *args,
               num_agents: int = 16, **kwargs):
    fn = functools.partial(agent_attention, num_agents=num_agents)
    super().__init__(num_heads, in_features, *args, attention_fn=fn, **kwargs)


class RandomFeatures(nnx.Variable):
  """Non-trainable random projection (not in nnx.Param)."""


class PerformerAttention(MultiHeadAttention):
  """MultiHeadAttention with FAVOR+ `performer_attention`.

  The projection [num_features, head_dim] is drawn at construction from
  `rngs.params()` and redrawn by `redraw(rng)` (e.g. every few steps).
  """

  def __init__(self, num_heads: int, in_features: int, *args,
               num_features: int = 256, orthogonal: bool = True,
               chunk_size: Optional[int] = None, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_heads, in_features, *args, rngs=rngs, **kwargs)
    self.num_features = num_features
    self.orthogonal = orthogonal
    self.chunk_size = chunk_size
    self.projection = RandomFeatures(orthogonal_random_features(
        rngs.params(), num_features, self.head_dim, orthogonal=orthogonal))

  def redraw(self, rng) -> None:
    self.projection.value = orthogonal_random_features(
        rng, self.num_features, self.head_dim, orthogonal=self.orthogonal)

  def attend(self, q, k, v, **kwargs):
    """FAVOR+ with this layer's current projection (the attend hook)."""
    return performer_attention(q, k, v, self.projection.value,
                               chunk_size=self.chunk_size, **kwargs)


class MoHAttention(MultiHeadAttention):
  """Mixture-of-Head attention (Jin et al. 2024).

  A router `Linear(in_features, num_heads + 2)` gives per token the shared,
  routed and mixing logits (`moh_gates`); the head outputs of
  `base_attention_fn` are weighted by the gates and summed through the
  output projection. `__call__(..., return_aux=True)` returns
  (y, {"load_balance_loss", "gates"}); the loss is also sown as
  `nnx.Intermediate` "load_balance_loss".
  """

  def __init__(self, num_heads: int, in_features: int, *args,
               num_shared_heads: int = 0, num_active_heads: Optional[int] = None,
               base_attention_fn=dot_product_attention, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(num_heads, in_features, *args,
                     attention_fn=base_attention_fn, rngs=rngs, **kwargs)
    num_active_heads = num_heads if num_active_heads is None else num_active_heads
    # Validates the counts (raises ValueError naming them).
    moh_gates(jnp.zeros((1, num_heads + 2)), num_shared_heads=num_shared_heads,
              num_active_heads=num_active_heads)
    self.num_shared_heads = num_shared_heads
    self.num_active_heads = num_active_heads
    self.router = nnx.Linear(in_features, num_heads + 2, use_bias=False,
                             rngs=rngs)

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               bias=None, is_causal: bool = False, return_aux: bool = False,
               attention_kwargs: Optional[dict] = None, attention_fn=None,
               **kwargs):
    gates, loss = moh_gates(self.router(inputs_q),
                            num_shared_heads=self.num_shared_heads,
                            num_active_heads=self.num_active_heads)
    base = self.attend if attention_fn is None else attention_fn

    def gated(q, k, v, **kw):
      return mixture_of_heads_attention(q, k, v, gates, attention_fn=base, **kw)

    # The gates reach the heads through the per-call attention_fn: the layer
    # itself is never modified during the call.
    y = super().__call__(inputs_q, inputs_k, inputs_v, mask=mask, bias=bias,
                         is_causal=is_causal, attention_fn=gated,
                         attention_kwargs=attention_kwargs, **kwargs)
    self.sow(nnx.Intermediate, "load_balance_loss", loss)
    if return_aux:
      return y, {"load_balance_loss": loss, "gates": gates}
    return y


class TriplewiseAttention(nnx.Module):
  """Triple-wise (2-simplicial) attention layer.

  Projections query, key1, value1, key2, value2 ([in, N|K, head_dim]) and an
  output projection; call `layer(x, x_kv=None, is_causal=...)`.
  """

  def __init__(self, num_heads: int, in_features: int, *,
               head_dim: Optional[int] = None, num_kv_heads: Optional[int] = None,
               out_features: Optional[int] = None,
               in_kv_features: Optional[int] = None, use_bias: bool = False,
               query_chunk: int = 64, key_chunk: int = 64, rngs: nnx.Rngs):
    head_dim = head_dim or in_features // num_heads
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(
          f"`num_heads` ({num_heads}) must be a multiple of `num_kv_heads` "
          f"({num_kv_heads}).")
    in_kv = in_kv_features or in_features
    self.num_heads, self.head_dim = num_heads, head_dim
    self.query_chunk, self.key_chunk = query_chunk, key_chunk

    def proj(fin, heads):
      return nnx.LinearGeneral(fin, (heads, head_dim), use_bias=use_bias,
                               rngs=rngs)

    self.query = proj(in_features, num_heads)
    self.key1 = proj(in_kv, num_kv_heads)
    self.value1 = proj(in_kv, num_kv_heads)
    self.key2 = proj(in_kv, num_kv_heads)
    self.value2 = proj(in_kv, num_kv_heads)
    self.out = nnx.LinearGeneral((num_heads, head_dim),
                                 out_features or in_features, axis=(-2, -1),
                                 use_bias=use_bias, rngs=rngs)

  def __call__(self, x, x_kv=None, *, is_causal: bool = False):
    x_kv = x if x_kv is None else x_kv
    o = triplewise_attention(
        self.query(x), self.key1(x_kv), self.value1(x_kv), self.key2(x_kv),
        self.value2(x_kv), is_causal=is_causal, query_chunk=self.query_chunk,
        key_chunk=self.key_chunk)
    return self.out(o)
