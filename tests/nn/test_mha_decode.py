"""KV-cache decoding and position options of attnjax.MultiHeadAttention:
the full causal forward against a float64 NumPy definition (projections,
RoPE / ALiBi from their formulas, causal softmax), decoding step by step
(single tokens and multi-token chunks) against the full forward, and
against flax.nnx.MultiHeadAttention's decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import positions as P
from tests.test_positions import alibi_slopes_np, rope_np

N, K, HD, D, T = 4, 2, 4, 8, 6


def mha_np(layer, x, *, rope=None, alibi=False):
  """float64 causal self-attention with the layer's parameters."""
  x = np.asarray(x, np.float64)
  p = lambda a: np.asarray(a[...], np.float64)
  q = np.einsum("btf,fnh->btnh", x, p(layer.query.kernel)) + p(layer.query.bias)
  k = np.einsum("btf,fnh->btnh", x, p(layer.key.kernel)) + p(layer.key.bias)
  v = np.einsum("btf,fnh->btnh", x, p(layer.value.kernel)) + p(layer.value.bias)
  b, t = x.shape[:2]
  pos = np.broadcast_to(np.arange(t), (b, t))
  if rope is not None:
    q = rope_np(q, pos, base=rope.base, fraction=rope.fraction,
                convention=rope.convention)
    k = rope_np(k, pos, base=rope.base, fraction=rope.fraction,
                convention=rope.convention)
  rep = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  if alibi:
    logits = logits - alibi_slopes_np(q.shape[2])[:, None, None] * (i - j)
  logits = np.where(j <= i, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bnts,bsnh->btnh", w, v)
  return np.einsum("btnh,nho->bto", o, p(layer.out.kernel)) + p(layer.out.bias)


ENCODINGS = {
    "none": None,
    "rope_half_partial": P.Rotary(fraction=0.5),
    "rope_interleaved": P.Rotary(convention="interleaved", base=100.0),
    "alibi": P.ALiBi("causal"),
}


def _layer(enc, seed=0):
  layer = attnjax.MultiHeadAttention(
      N, D, num_kv_heads=K, head_dim=HD, positions=ENCODINGS[enc],
      bias_init=nnx.initializers.normal(0.5), rngs=nnx.Rngs(seed))
  return layer


@pytest.mark.parametrize("enc", sorted(ENCODINGS))
def test_decoding_equals_full_causal_forward(enc):
  layer = _layer(enc)
  x = jax.random.normal(jax.random.key(1), (2, T, D))
  full = layer(x, is_causal=True)
  e = ENCODINGS[enc]
  ref = mha_np(layer, x, rope=e if isinstance(e, P.Rotary) else None,
               alibi=isinstance(e, P.ALiBi))
  np.testing.assert_allclose(np.asarray(full), ref, atol=2e-5, rtol=2e-5)
  for chunks in ([1] * T, [3, 2, 1]):
    layer.init_cache(x.shape, jnp.float32)
    outs, start = [], 0
    for c in chunks:
      outs.append(layer(x[:, start:start + c], decode=True))
      start += c
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)),
                               np.asarray(full), atol=2e-5, rtol=2e-5)
    assert int(layer.cache_index[...]) == T


def test_decoding_under_jit_and_overflow():
  layer = _layer("rope_half_partial")
  x = jax.random.normal(jax.random.key(2), (1, T, D))
  full = layer(x, is_causal=True)
  layer.init_cache((1, T, D))
  step = nnx.jit(lambda m, xt: m(xt, decode=True))
  outs = [step(layer, x[:, i:i + 1]) for i in range(T)]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)),
                             np.asarray(full), atol=2e-5)
  # the cache is full: eager raises, jit returns NaN (never silent)
  with pytest.raises(ValueError, match="overflows"):
    layer(x[:, :1], decode=True)
  assert bool(jnp.all(jnp.isnan(step(layer, x[:, :1]))))
  fresh = _layer("none")
  with pytest.raises(ValueError, match="init_cache"):
    fresh(x[:, :1], decode=True)


def test_decoding_matches_flax():
  ref = nnx.MultiHeadAttention(N, D, qkv_features=N * HD, num_kv_heads=K,
                               decode=True, rngs=nnx.Rngs(3))
  ours = attnjax.MultiHeadAttention(N, D, num_kv_heads=K, head_dim=HD,
                                    decode=True, rngs=nnx.Rngs(4))
  for name in ("query", "key", "value", "out"):
    getattr(ours, name).kernel[...] = getattr(ref, name).kernel[...]
    getattr(ours, name).bias[...] = getattr(ref, name).bias[...]
  x = jax.random.normal(jax.random.key(5), (2, 4, D))
  ref.init_cache(x.shape)
  ours.init_cache(x.shape)
  for i in range(4):
    np.testing.assert_allclose(np.asarray(ours(x[:, i:i + 1])),
                               np.asarray(ref(x[:, i:i + 1])), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(ours.cached_key[...]),
                                np.asarray(ref.cached_key[...]))


def test_axial_rotary_layer_option():
  layer = attnjax.MultiHeadAttention(2, 8, head_dim=8,
                                     positions=P.Rotary(axes=2, base=100.0),
                                     rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(6), (1, 6, 8))
  with pytest.raises(ValueError, match="input_positions"):
    layer(x)
  grid = P.grid_positions(2, 3)                               # [6, 2]
  got = layer(x, input_positions=grid)
  q, k, v = (layer.query(x), layer.key(x), layer.value(x))
  q = P.apply_rope(q, grid[None], base=100.0)
  k = P.apply_rope(k, grid[None], base=100.0)
  want = layer.out(attnjax.dot_product_attention(q, k, v))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  with pytest.raises(ValueError, match="positions"):
    attnjax.MultiHeadAttention(2, 8, positions="rope", rngs=nnx.Rngs(0))


def test_transformer_block_forwards_positions():
  blk = attnjax.TransformerBlock(8, 2, mlp_dim=0, positions=P.ALiBi("causal"),
                                 rngs=nnx.Rngs(0))
  assert blk.attn.positions == P.ALiBi("causal")
  x = jax.random.normal(jax.random.key(7), (1, 5, 8))
  h = blk.norm1(x)
  q, k, v = blk.attn.project_qkv(h)
  bias = P.alibi_bias(2, 5)[None]
  want = x + blk.attn.out(attnjax.dot_product_attention(q, k, v, bias=bias,
                                                        is_causal=True))
  np.testing.assert_allclose(np.asarray(blk(x, is_causal=True)),
                             np.asarray(want), atol=1e-5)
