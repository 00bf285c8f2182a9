"""PowerAttention: power-of-two block layout and its block-sparse attention
against a float64 dense-mask softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc

POWERS = {1, 2, 4, 8, 16, 32, 64}


def _dense_mask64(t, s, bs, window_blocks, sink_blocks, is_causal):
  m = np.zeros((t, s), bool)
  for i in range(t):
    for j in range(s):
      d = i // bs - j // bs
      dd = d if is_causal else abs(d)
      ok = (0 <= dd < window_blocks) or dd in POWERS or j // bs < sink_blocks
      if is_causal:
        ok = ok and j <= i
      m[i, j] = ok
  return m


def _ref64(q, k, v, block_size=4, *, window_blocks=1, sink_blocks=1,
           is_causal=False, mask=None):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  allowed = _dense_mask64(t, s, block_size, window_blocks, sink_blocks,
                          is_causal)
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for hd in range(n):
      z = q[bi, :, hd] @ k[bi, :, hd // g].T / np.sqrt(h)
      ok = allowed & keep[bi][None, :]
      z = np.where(ok, z, -np.inf)
      zmax = np.where(ok.any(1), z.max(1), 0.0)
      p = np.where(ok, np.exp(z - zmax[:, None]), 0.0)
      den = p.sum(1, keepdims=True)
      out[bi, :, hd] = np.where(den > 0, p / np.where(den > 0, den, 1), 0) @ (
          v[bi, :, hd // g])
  return out


def test_layout_rows_and_exponential_receptive_field():
  lay = sq.power_layout(64, window_blocks=1, sink_blocks=0)
  # Row i: itself plus i - 2**m >= 0: 1 + floor(log2 i) + 1 blocks at most.
  assert lay.sum(1).max() == 1 + 6
  assert not np.any(np.triu(lay, 1))
  # L layers reach exactly the distances that are sums of at most L powers
  # of two (popcount <= L), so every earlier block within 2**L - 1: the
  # receptive field grows exponentially with depth.
  reach = np.eye(64, dtype=bool)
  d = np.arange(64)[:, None] - np.arange(64)[None, :]
  popcount = np.vectorize(lambda x: bin(x).count("1") if x >= 0 else 99)(d)
  for layers in range(1, 5):
    reach = (reach.astype(int) @ lay.astype(int)) > 0
    np.testing.assert_array_equal(reach, popcount <= layers)
    assert np.all(reach[(d >= 0) & (d < 2 ** layers)])
  sym = sq.power_layout(8, 6, window_blocks=2, sink_blocks=1, is_causal=False)
  want = _dense_mask64(8, 6, 1, 2, 1, False)
  np.testing.assert_array_equal(sym, want)


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False),
                                          (False, True), (True, True)])
def test_four_patterns_match_float64(causal, cross):
  q, k, v = zc.inputs(0, t=24, s=18 if cross else 24)
  zc.check_values(sq.power_attention, _ref64, q, k, v, block_size=2,
                  window_blocks=1, sink_blocks=1, is_causal=causal)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2, t=16)
  fn, ref = sq.power_attention, sq.power_attention_reference
  kw = dict(block_size=2, is_causal=True, sink_blocks=0)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(ValueError, match="head_dim"):
    sq.power_attention(q, k[..., :5], v, 4)
  with pytest.raises(ValueError, match="window_blocks"):
    sq.power_layout(4, window_blocks=-1)
  with pytest.raises(ValueError, match="num_q_blocks"):
    sq.power_layout(0)
  with pytest.raises(ValueError, match="block_size"):
    sq.power_attention(q, k, v, 0)
  with pytest.raises(ValueError, match="implementation"):
    sq.power_attention(q, k, v, 4, implementation="nope")


def test_layer():
  layer = sq.PowerAttention(4, 16, num_kv_heads=2, head_dim=8, block_size=2,
                            rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.power_attention_reference(q, k, v, 2, is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  y2 = layer(x.at[:, 9:].set(3.0), is_causal=True)
  np.testing.assert_allclose(y2[:, :9], y[:, :9], rtol=1e-5, atol=1e-5)
