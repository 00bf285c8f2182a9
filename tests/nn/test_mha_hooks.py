"""Layers never modify themselves during a call: the attend hook, per-call
attention_fn, MoH, Performer and attention-map extraction."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import sequence as sq
from attnjax.models.vision.attention_maps import attention_maps
from attnjax.models.vision._layers import Block


def _snapshot(module):
  graphdef, state = nnx.split(module)
  def host(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    return np.asarray(a)
  return graphdef, jax.tree.map(host, state.to_pure_dict())


def _assert_same(a, b):
  assert a[0] == b[0]
  jax.tree.map(np.testing.assert_array_equal, a[1], b[1])


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def test_mha_state_and_graph_unchanged_by_calls():
  layer = attnjax.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  before = _snapshot(layer)
  x = _x((2, 5, 8))
  layer(x, is_causal=True)
  layer(x, attention_fn=attnjax.linear_attention)
  _assert_same(before, _snapshot(layer))


def test_per_call_attention_fn_and_attend_override():
  layer = attnjax.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  x = _x((2, 5, 8))
  q, k, v = layer.project_qkv(x)
  want = layer.out(attnjax.linear_attention(q, k, v, is_causal=True))
  got = layer(x, is_causal=True, attention_fn=attnjax.linear_attention)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  assert layer.attention_fn is attnjax.dot_product_attention

  class Doubled(attnjax.MultiHeadAttention):
    def attend(self, query, key, value, **kwargs):
      return 2.0 * super().attend(query, key, value, **kwargs)

  d = Doubled(2, 8, rngs=nnx.Rngs(0))
  base = d.out(attnjax.dot_product_attention(q, k, v))
  bias = d.out.bias[...]
  np.testing.assert_allclose(np.asarray(d(x) - bias),
                             2.0 * np.asarray(base - bias), atol=1e-5)
  with pytest.raises(NotImplementedError, match="sow_weights"):
    d(x, sow_weights=True)          # an overridden attend is not plain softmax


def test_moh_not_modified_during_call():
  """The old MoH swapped self.attention_fn for a gated closure during the
  call: the graph seen from inside the attention differed."""
  holder, seen = [], []

  def base(q, k, v, **kw):
    seen.append(_snapshot(holder[0]))
    return attnjax.dot_product_attention(q, k, v, **kw)

  layer = sq.MoHAttention(4, 16, head_dim=4, num_shared_heads=1,
                          num_active_heads=3, base_attention_fn=base,
                          rngs=nnx.Rngs(0))
  holder.append(layer)
  before = _snapshot(layer)
  x = _x((1, 6, 16))
  y = layer(x, is_causal=True)
  _assert_same(before, seen[0])              # as seen from inside the call
  # under nnx.capture the loss is collected and nothing is left behind
  y2, sown = nnx.capture(layer, nnx.Intermediate)(x, is_causal=True)
  assert "load_balance_loss" in sown
  np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
  nnx.pop(layer, nnx.Intermediate)          # the plain call's sown loss
  _assert_same(before, _snapshot(layer))
  # per-call attention_fn replaces the base inside the gating
  y_lin = layer(x, attention_fn=attnjax.linear_attention, is_causal=True)
  assert float(jnp.max(jnp.abs(y_lin - y))) > 1e-4


def test_performer_clone_uses_its_own_projection():
  """The old layer stored a bound method of itself as attention_fn: a clone
  (or split/merge) kept calling the original's projection."""
  layer = sq.PerformerAttention(2, 8, num_features=16, rngs=nnx.Rngs(0))
  x = _x((1, 5, 8))
  before = _snapshot(layer)
  y = layer(x)
  _assert_same(before, _snapshot(layer))
  twin = nnx.clone(layer)
  twin.redraw(jax.random.key(7))
  q, k, v = twin.project_qkv(x)
  want = twin.out(sq.performer_attention(q, k, v, twin.projection[...]))
  np.testing.assert_allclose(np.asarray(twin(x)), np.asarray(want), atol=1e-5)
  assert float(jnp.max(jnp.abs(twin(x) - y))) > 1e-4
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(y), atol=0)


class _Tokens(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([
        Block(8, attnjax.MultiHeadAttention(2, 8, rngs=rngs), mlp_ratio=1.0,
              rngs=rngs),
        Block(8, sq.MoHAttention(2, 8, num_shared_heads=1, num_active_heads=2,
                                 rngs=rngs), mlp_ratio=1.0, rngs=rngs),
    ])

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


def test_attention_maps_leave_the_model_untouched():
  """The old extraction set Block.record on the model and popped every
  nnx.Intermediate afterwards, including ones the user had."""
  model = _Tokens(nnx.Rngs(0))
  x = _x((1, 5, 8))
  model(x)                       # MoH sows its load-balancing loss
  assert jax.tree.leaves(nnx.state(model, nnx.Intermediate))
  before = _snapshot(model)
  maps = attention_maps(model, x)
  _assert_same(before, _snapshot(model))
  assert all(not b.record for b in model.blocks)
  assert sorted(maps) == ["blocks/0", "blocks/1"]
  # block 0's map is the softmax of its projected queries/keys at its input
  h = model.blocks[0].norm1(x)
  q, k, _ = model.blocks[0].attn.project_qkv(h)
  np.testing.assert_allclose(np.asarray(maps["blocks/0"]),
                             np.asarray(attnjax.attention_weights(q, k)),
                             atol=1e-6)
  assert maps["blocks/1"].shape == (1, 2, 5, 5)
