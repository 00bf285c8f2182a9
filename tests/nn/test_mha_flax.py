"""flax.nnx.MultiHeadAttention's test cases (flax tests/nnx/nn/attention_test.py:
shapes, sown weights, decode cache shapes, keep_rngs, equivalence across
use_bias/dtype/precision/decode/normalize_qk) run against
attnjax.MultiHeadAttention, plus flax features: float masks, several batch
dims, broadcast_dropout, out_bias_init, precision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.lax import Precision

import attnjax


def _copy_from_flax(ours, ref, use_bias=True, normalize_qk=False):
  for name in ("query", "key", "value", "out"):
    getattr(ours, name).kernel[...] = getattr(ref, name).kernel[...]
    if use_bias:
      getattr(ours, name).bias[...] = getattr(ref, name).bias[...]
  if normalize_qk:
    ours.query_ln.scale[...] = ref.query_ln.scale[...]
    ours.key_ln.scale[...] = ref.key_ln.scale[...]


def test_basic():
  module = attnjax.MultiHeadAttention(num_heads=2, in_features=3,
                                      qkv_features=6, out_features=6,
                                      rngs=nnx.Rngs(0))
  assert module(jnp.ones((1, 7, 3)), decode=False).shape == (1, 7, 6)


def test_multihead_sow_attention_weights():
  class Model(nnx.Module):
    def __init__(self, kw, rngs):
      self.attention_layers = nnx.List([
          attnjax.MultiHeadAttention(**kw, rngs=rngs) for _ in range(3)])

    def __call__(self, x, sow_weights=False):
      x = self.attention_layers[0](x, sow_weights=sow_weights)
      x = self.attention_layers[1](x)
      return self.attention_layers[2](x, sow_weights=sow_weights)

  module = Model(dict(in_features=8, num_heads=8,
                      kernel_init=nnx.initializers.ones_init(),
                      bias_init=nnx.initializers.zeros_init(),
                      deterministic=False), nnx.Rngs(0))
  module.set_attributes(decode=False)
  x = jnp.ones((4, 6, 8))
  module(x, True)
  inter = nnx.pop(module, nnx.Intermediate)
  assert inter["attention_layers"][0]["attention_weights"].value[0].shape == (
      4, 8, 6, 6)
  assert 1 not in inter["attention_layers"]
  assert inter["attention_layers"][2]["attention_weights"].value[0].shape == (
      4, 8, 6, 6)
  module(x)
  assert not nnx.pop(module, nnx.Intermediate)


def test_autoregressive_decode_cache_shapes():
  x = jnp.ones((1, 4, 4))
  module = attnjax.MultiHeadAttention(in_features=4, num_heads=2,
                                      qkv_features=4, decode=True,
                                      rngs=nnx.Rngs(0))
  module.init_cache(x.shape, dtype=x.dtype)
  assert module.cached_key[...].shape == (1, 4, 2, 2)
  assert module.cached_value[...].shape == (1, 4, 2, 2)
  assert module(x[:, :1, :]).shape == (1, 1, 4)
  assert module(x[:, 1:2, :]).shape == (1, 1, 4)
  assert int(module.cache_index[...]) == 2


@pytest.mark.parametrize("keep_rngs", [True, False])
def test_keep_rngs(keep_rngs):
  module = attnjax.MultiHeadAttention(in_features=4, num_heads=2,
                                      qkv_features=4, decode=True,
                                      rngs=nnx.Rngs(42), dropout_rate=0.5,
                                      keep_rngs=keep_rngs)
  assert (module.rngs is not None) == keep_rngs
  if keep_rngs:
    _, _, nondiff = nnx.split(module, nnx.Param, ...)
    assert nondiff["rngs"]["count"].type is nnx.RngCount
    assert nondiff["rngs"]["key"].type is nnx.RngKey
  else:
    nnx.split(module, nnx.Param)
    x = jnp.ones((1, 3, 4))
    with pytest.raises(ValueError, match="rngs"):
      module(x, decode=False)
    assert module(x, decode=False, rngs=nnx.Rngs(dropout=1)).shape == (1, 3, 4)


@pytest.mark.parametrize(
    "use_bias, dtype, param_dtype, precision, decode, normalize_qk", [
        (True, jnp.float32, jnp.float32, Precision.DEFAULT, False, False),
        (False, jnp.float32, jnp.float32, Precision.HIGHEST, True, True),
        (True, jnp.float16, jnp.float32, Precision.HIGH, True, False),
        (True, jnp.float32, jnp.float16, Precision.DEFAULT, False, True),
    ])
def test_equivalence_with_flax(use_bias, dtype, param_dtype, precision,
                               decode, normalize_qk):
  kw = dict(num_heads=2, in_features=3, qkv_features=6, out_features=6,
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            precision=precision, decode=decode, normalize_qk=normalize_qk)
  ref = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(42))
  ours = attnjax.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  _copy_from_flax(ours, ref, use_bias, normalize_qk)
  assert ours.query.precision == precision
  x = jnp.ones((1, 3))              # flax's case: no batch dims, one token
  if decode:
    ref.init_cache(x.shape, dtype=dtype)
    ours.init_cache(x.shape, dtype=dtype)
  tol = 1e-5 if dtype == jnp.float32 and param_dtype == jnp.float32 else 5e-3
  out, want = ours(x), ref(x)
  assert out.shape == want.shape == (1, 6) and out.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_several_batch_dims_and_defaults_match_flax():
  ref = nnx.MultiHeadAttention(num_heads=8, in_features=5, qkv_features=16,
                               decode=False, rngs=nnx.Rngs(0))
  ours = attnjax.MultiHeadAttention(num_heads=8, in_features=5,
                                    qkv_features=16, rngs=nnx.Rngs(1))
  _copy_from_flax(ours, ref)
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  shape = (4, 3, 2, 5)
  q, k, v = (jax.random.uniform(kk, shape) for kk in (k1, k2, k3))
  np.testing.assert_allclose(np.asarray(ours(q, k, v)),
                             np.asarray(ref(q, k, v)), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ours(q, k)), np.asarray(ours(q, k, k)))
  np.testing.assert_array_equal(np.asarray(ours(q)), np.asarray(ours(q, q, q)))
  # a mask with the batch dims [4, 3, heads, T, S]
  m = jax.random.bernoulli(jax.random.key(5), 0.7, (4, 3, 1, 2, 2))
  np.testing.assert_allclose(np.asarray(ours(q, k, v, mask=m)),
                             np.asarray(ref(q, k, v, mask=m)), atol=1e-5)


def test_float_masks_as_flax():
  """flax.nnx.make_attention_mask returns float32 masks; nonzero = attend."""
  ref = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                               rngs=nnx.Rngs(0))
  ours = attnjax.MultiHeadAttention(num_heads=2, in_features=8,
                                    rngs=nnx.Rngs(1))
  _copy_from_flax(ours, ref)
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  tokens = jnp.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 0]])
  fmask = nnx.make_attention_mask(tokens > 0, tokens > 0)
  assert fmask.dtype == jnp.float32
  got = ours(x, mask=fmask)
  valid = np.asarray(tokens > 0)
  # rows of real tokens agree; a padded query (nothing to attend) gives
  # zeros before the output projection here (flax: uniform weights)
  np.testing.assert_allclose(np.asarray(got)[valid],
                             np.asarray(ref(x, mask=fmask))[valid], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(ours(x, mask=fmask > 0)))


def test_out_bias_init_and_precision():
  layer = attnjax.MultiHeadAttention(
      2, 4, bias_init=nnx.initializers.constant(0.5),
      out_bias_init=nnx.initializers.constant(-2.0),
      precision=Precision.HIGHEST, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(layer.query.bias[...]), 0.5)
  np.testing.assert_array_equal(np.asarray(layer.out.bias[...]), -2.0)
  assert layer.out.precision == Precision.HIGHEST
  seen = {}

  def fn(q, k, v, precision=None, **kw):
    seen["precision"] = precision
    return attnjax.dot_product_attention(q, k, v, **kw)

  layer(jnp.ones((1, 3, 4)), attention_fn=fn)
  assert seen["precision"] == Precision.HIGHEST


def test_broadcast_dropout_shares_one_mask():
  """flax's broadcast_dropout: one [T, S] dropout mask for every batch
  element and head. With identical examples and identical heads, outputs
  agree across batch and heads exactly when the mask is shared."""
  n, d, t = 2, 4, 6

  def build(broadcast):
    layer = attnjax.MultiHeadAttention(n, d, head_dim=d, dropout_rate=0.5,
                                       broadcast_dropout=broadcast,
                                       rngs=nnx.Rngs(0))
    for name in ("query", "key", "value"):
      w = getattr(layer, name).kernel[...]
      getattr(layer, name).kernel[...] = jnp.broadcast_to(w[:, :1], w.shape)
    return layer

  x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, t, d)),
                       (3, t, d))
  for broadcast in (True, False):
    layer = build(broadcast)
    wo = layer.out.kernel[...]
    per_head = []
    for h in range(n):       # output through head h alone (same W_O block)
      layer.out.kernel[...] = jnp.zeros_like(wo).at[h].set(wo[0])
      per_head.append(np.asarray(layer(x, rngs=nnx.Rngs(dropout=3))))
    layer.out.kernel[...] = wo
    same_batch = np.allclose(per_head[0][0], per_head[0][1], atol=1e-6)
    same_head = np.allclose(per_head[0], per_head[1], atol=1e-6)
    assert same_batch == broadcast and same_head == broadcast, broadcast
  # deterministic calls give the dropout-free output either way
  np.testing.assert_allclose(
      np.asarray(build(True)(x, deterministic=True)),
      np.asarray(build(False)(x, deterministic=True)), atol=1e-6)
