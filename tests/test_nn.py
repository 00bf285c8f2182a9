"""NNX layers: parameter counts, agreement with flax.nnx, pluggable attention_fn."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from tests.reference_np import attention_np


def _count(module):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_param_count(use_bias):
  d, n, kh, h, out = 32, 8, 2, 12, 20
  layer = attnjax.MultiHeadAttention(n, d, out_features=out, num_kv_heads=kh,
                                     head_dim=h, use_bias=use_bias,
                                     rngs=nnx.Rngs(0))
  expected = d * n * h + 2 * d * kh * h + n * h * out
  if use_bias:
    expected += n * h + 2 * kh * h + out
  assert _count(layer) == expected


def test_head_dim_independent_of_width():
  """Fixed head size (low-rank-bottleneck remedy): head_dim > width / heads."""
  layer = attnjax.MultiHeadAttention(16, 64, head_dim=64, rngs=nnx.Rngs(0))
  assert layer.query.kernel.shape == (64, 16, 64)
  assert layer(jnp.ones((1, 5, 64))).shape == (1, 5, 64)


def _copy_params(dst, src):
  for name in ("query", "key", "value", "out"):
    getattr(dst, name).kernel[...] = getattr(src, name).kernel[...]
    getattr(dst, name).bias[...] = getattr(src, name).bias[...]


@pytest.mark.parametrize("num_kv_heads", [None, 2])
def test_matches_flax_multihead_attention(num_kv_heads):
  d, n = 32, 4
  kw = {} if num_kv_heads is None else {"num_kv_heads": num_kv_heads}
  ref = nnx.MultiHeadAttention(n, d, decode=False, rngs=nnx.Rngs(1), **kw)
  ours = attnjax.MultiHeadAttention(n, d, rngs=nnx.Rngs(2), **kw)
  _copy_params(ours, ref)
  x = jax.random.normal(jax.random.key(0), (2, 7, d))
  y = jax.random.normal(jax.random.key(1), (2, 9, d))
  mask = jnp.tril(jnp.ones((7, 7), bool))[None, None]
  np.testing.assert_allclose(ours(x, mask=mask), ref(x, mask=mask),
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ours(x, y), ref(x, y), atol=1e-5, rtol=1e-5)


def test_layer_matches_numpy_definition():
  d, n, h = 10, 3, 5
  layer = attnjax.MultiHeadAttention(n, d, head_dim=h, out_features=1,
                                     use_bias=False, rngs=nnx.Rngs(3))
  x = np.random.default_rng(0).standard_normal((2, 6, d))
  wq, wk, wv, wo = (np.asarray(getattr(layer, a).kernel[...], np.float64)
                    for a in ("query", "key", "value", "out"))
  q = np.einsum("btd,dnh->btnh", x, wq)
  k = np.einsum("btd,dnh->btnh", x, wk)
  v = np.einsum("btd,dnh->btnh", x, wv)
  o = attention_np(q, k, v, is_causal=True)["out"]
  ref = np.einsum("btnh,nho->bto", o, wo)
  np.testing.assert_allclose(layer(jnp.asarray(x, jnp.float32), is_causal=True),
                             ref, atol=1e-5)
  kq, ov = layer.merged_matrices()
  np.testing.assert_allclose(kq, np.einsum("anh,bnh->nab", wq, wk), atol=1e-6)
  np.testing.assert_allclose(ov, np.einsum("anh,nho->nao", wv, wo), atol=1e-6)


def test_swapped_attention_fn_runs_and_gets_only_needed_kwargs():
  seen = {}

  def plain_linear(q, k, v, **kw):
    seen.update(kw)
    return jnp.einsum("btnh,bsnh,bsnd->btnd", q, k, v) / k.shape[1]

  layer = attnjax.MultiHeadAttention(2, 8, attention_fn=plain_linear,
                                     rngs=nnx.Rngs(0))
  out = layer(jnp.ones((1, 4, 8)))
  assert out.shape == (1, 4, 8) and not seen
  chunked = functools.partial(attnjax.dot_product_attention,
                              implementation="chunked")
  layer2 = attnjax.MultiHeadAttention(2, 8, attention_fn=chunked,
                                      rngs=nnx.Rngs(0))
  layer3 = attnjax.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 6, 8))
  np.testing.assert_allclose(layer2(x, is_causal=True), layer3(x, is_causal=True),
                             atol=1e-5)


def test_sow_weights_and_dropout():
  layer = attnjax.MultiHeadAttention(2, 8, dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (1, 6, 8))
  a = layer(x, deterministic=True, sow_weights=True)
  w = layer.attention_weights.value[0] if hasattr(layer.attention_weights, "value") else layer.attention_weights[0]
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
  b = layer(x)  # stochastic
  assert not np.allclose(a, b)
  layer.eval()
  np.testing.assert_allclose(layer(x), a, atol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="num_kv_heads"):
    attnjax.MultiHeadAttention(3, 8, num_kv_heads=2, rngs=nnx.Rngs(0))
  layer = attnjax.MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="inputs_q"):
    layer(jnp.ones((1, 3, 7)))


def test_transformer_block_and_encoder():
  enc = attnjax.TransformerEncoder(2, 16, 4, mlp_dim=32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  y = enc(x, is_causal=True)
  assert y.shape == x.shape
  enc(x, is_causal=True, sow_weights=True)
  w = enc.blocks[1].attn.attention_weights[0]
  assert w.shape == (2, 4, 5, 5)
  np.testing.assert_allclose(np.triu(np.asarray(w)[0, 0], 1), 0.0)
  # Causality: changing a later token leaves earlier outputs unchanged.
  x2 = x.at[:, -1].set(0.0)
  np.testing.assert_allclose(enc(x2, is_causal=True)[:, :-1], y[:, :-1], atol=1e-5)
  # Attention-only block (mlp_dim=0) has no MLP params; grads flow.
  blk = attnjax.TransformerBlock(16, 4, mlp_dim=0, rngs=nnx.Rngs(1))
  assert blk.mlp is None
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(blk)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_sow_weights_refuses_non_softmax_attention_fn():
  layer = attnjax.MultiHeadAttention(2, 8, attention_fn=attnjax.linear_attention,
                                     rngs=nnx.Rngs(0))
  x = jnp.ones((1, 4, 8))
  assert layer(x).shape == (1, 4, 8)
  with pytest.raises(NotImplementedError, match="sow_weights"):
    layer(x, sow_weights=True)
  chunked = functools.partial(attnjax.dot_product_attention, implementation="chunked")
  layer2 = attnjax.MultiHeadAttention(2, 8, attention_fn=chunked, rngs=nnx.Rngs(0))
  layer2(x, sow_weights=True)


# ----------------------------------------- argument validation, NaN padding
@pytest.mark.parametrize("kw, needle, exc", [
    (dict(num_heads=0, in_features=8), "num_heads", ValueError),
    (dict(num_heads=2, in_features=8, head_dim=0), "head_dim", ValueError),
    (dict(num_heads=2, in_features=8, num_kv_heads=0), "num_kv_heads",
     ValueError),
    (dict(num_heads=2.0, in_features=8), "num_heads", TypeError),
    (dict(num_heads=2, in_features=8, head_dim=4.5), "head_dim", TypeError),
    (dict(num_heads=2, in_features=8, dropout_rate=2.0), "dropout_rate",
     ValueError),
    (dict(num_heads=2, in_features=8, dropout_rate=-0.5), "dropout_rate",
     ValueError),
])
def test_multi_head_attention_validates(kw, needle, exc):
  with pytest.raises(exc, match=needle):
    attnjax.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw, needle", [
    (dict(mlp_dim=-4), "mlp_dim"),                # was: MLP silently dropped
    (dict(mlp_dim=8.5), "mlp_dim"),
    (dict(dropout_rate=2.0), "dropout_rate"),
    (dict(dropout_rate=-0.5), "dropout_rate"),
    (dict(attention_dropout_rate=1.0), "attention_dropout_rate"),
])
def test_transformer_block_validates(kw, needle):
  with pytest.raises((ValueError, TypeError), match=needle):
    attnjax.TransformerBlock(8, 2, **kw, rngs=nnx.Rngs(0))


def test_layers_accept_numpy_integers():
  layer = attnjax.MultiHeadAttention(np.int64(2), np.int32(8),
                                     head_dim=np.int64(4), rngs=nnx.Rngs(0))
  assert layer.num_heads == 2 and layer.head_dim == 4
  blk = attnjax.TransformerBlock(np.int64(8), np.int64(2),
                                 mlp_dim=np.int64(16), rngs=nnx.Rngs(0))
  assert blk.mlp is not None
  x = jnp.ones((1, 3, 8))
  assert blk(x).shape == (1, 3, 8)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_nan_in_padded_key_value_inputs_reaches_nothing(impl):
  """Cross-attention whose key/value inputs hold NaN / Inf past the
  lengths (or in all-False mask columns): output and every gradient
  (parameters and inputs) equal the run with zeros there."""
  d, b, t, s = 8, 2, 5, 7
  rng = np.random.default_rng(0)
  xq = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  xkv = np.asarray(rng.standard_normal((b, s, d)), np.float32)
  kl = np.array([4, s])
  mask = np.ones((b, 1, t, s), bool)
  mask[1, :, :, 2] = False
  dead = (np.arange(s)[None, :] >= kl[:, None])
  dead[1, 2] = True
  bad = xkv.copy()
  bad[dead] = np.nan
  bad[1, 2] = np.inf
  clean = xkv.copy()
  clean[dead] = 0.0
  attn_fn = functools.partial(attnjax.dot_product_attention,
                              implementation=impl)
  for block in (False, True):
    if block:
      layer = attnjax.TransformerBlock(d, 2, attention_fn=attn_fn,
                                       rngs=nnx.Rngs(1))
      # Self-attention block: padded queries are the caller's business, so
      # only the key side holds garbage here (queries clean, keys = values).
      run = lambda m, x: m.attn(xq, x, mask=jnp.asarray(mask),
                                attention_kwargs=dict(
                                    key_value_seq_lengths=jnp.asarray(kl)))
    else:
      layer = attnjax.MultiHeadAttention(2, d, attention_fn=attn_fn,
                                         rngs=nnx.Rngs(1))
      run = lambda m, x: m(xq, x, mask=jnp.asarray(mask), attention_kwargs=dict(
          key_value_seq_lengths=jnp.asarray(kl)))

    def loss(m, x):
      return jnp.sum(run(m, x) ** 2)

    outs, grads = [], []
    for x in (clean, bad):
      x = jnp.asarray(x)
      outs.append(np.asarray(run(layer, x)))
      gp, gx = nnx.grad(loss, argnums=(0, 1))(layer, x)
      grads.append((jax.tree.leaves(nnx.state(gp)), np.asarray(gx)))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
    for a, c in zip(grads[1][0], grads[0][0]):
      assert np.all(np.isfinite(np.asarray(a)))
      np.testing.assert_allclose(a, c, atol=1e-5)
    assert np.all(grads[1][1][dead] == 0.0)
    np.testing.assert_allclose(grads[1][1], grads[0][1], atol=1e-6)
