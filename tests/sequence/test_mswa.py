"""MSWA: per-head (and per-layer) sliding windows against a float64 per-head
band softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import sequence as sq
from tests.sequence import zoo_checks as zc

WINDOWS = (1, 3, (2, 0), 5)


def _ref64(q, k, v, window_sizes, *, is_causal=False, mask=None,
           block_size=None):
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  keep = np.ones((b, s), bool) if mask is None else np.broadcast_to(
      np.asarray(mask)[:, 0, 0, :], (b, s))
  out = np.zeros((b, t, n, v.shape[-1]))
  for hd in range(n):
    w = window_sizes[hd]
    left, right = (w, w) if np.isscalar(w) else w
    if is_causal:
      right = 0
    for bi in range(b):
      for i in range(t):
        j = np.arange(s)
        ok = keep[bi] & (j >= i - left) & (j <= i + right)
        if not ok.any():
          continue
        z = np.where(ok, k[bi, :, hd // g] @ q[bi, i, hd] / np.sqrt(h), -np.inf)
        p = np.exp(z - z.max())
        out[bi, i, hd] = p @ v[bi, :, hd // g] / p.sum()
  return out


@pytest.mark.parametrize("causal,cross", [(False, False), (True, False),
                                          (False, True), (True, True)])
def test_four_patterns_match_float64(causal, cross):
  q, k, v = zc.inputs(0, t=13, s=9 if cross else 13)
  zc.check_values(sq.mswa_attention, _ref64, q, k, v, window_sizes=WINDOWS,
                  is_causal=causal, block_size=4)


def test_grads_bf16_vmap_masks():
  q, k, v = zc.inputs(2)
  fn, ref = sq.mswa_attention, sq.mswa_attention_reference
  kw = dict(window_sizes=WINDOWS, is_causal=True)
  zc.check_grads_bf16_vmap_masks(fn, ref, q, k, v, **kw)


def test_window_allocation_heads_and_layers():
  assert sq.mswa_window_sizes(8, 64) == (16, 16, 32, 32, 64, 64, 128, 128)
  assert sq.mswa_window_sizes(4, 64, layer=0, num_layers=8) == (4, 8, 16, 32)
  assert sq.mswa_window_sizes(4, 64, layer=7, num_layers=8) == (32, 64, 128,
                                                                256)
  total = sum(sum(sq.mswa_window_sizes(4, 64, layer=l, num_layers=4))
              for l in range(4))
  assert total == 225 * 64 * 16 // 256          # (15/16)**2 of 16 * 64


def test_errors():
  q, k, v = zc.inputs(3)
  with pytest.raises(ValueError, match="window_sizes"):
    sq.mswa_attention(q, k, v, (1, 2, 3))
  with pytest.raises(ValueError, match="window_sizes"):
    sq.mswa_attention(q, k, v, (1, 2, 3, -1))
  with pytest.raises(ValueError, match="window_sizes"):
    sq.mswa_attention(q, k, v, 3)
  with pytest.raises(ValueError, match="head_dim"):
    sq.mswa_attention(q, k[..., :5], v, WINDOWS)
  with pytest.raises(ValueError, match="layer"):
    sq.mswa_window_sizes(4, 64, layer=4, num_layers=4)
  with pytest.raises(ValueError, match="implementation"):
    sq.mswa_attention(q, k, v, WINDOWS, implementation="nope")


def test_layer_stack_windows():
  layers = [sq.MSWAAttention(4, 16, num_kv_heads=2, head_dim=8, base_window=4,
                             layer=l, num_layers=2, rngs=nnx.Rngs(l))
            for l in range(2)]
  assert layers[0].window_sizes == (1, 1, 1, 2)
  assert layers[1].window_sizes == (1, 2, 4, 8)
  layer = layers[1]
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y = nnx.jit(lambda m, x: m(x, is_causal=True))(layer, x)
  q, k, v = layer.project_qkv(x)
  want = layer.out(sq.mswa_attention_reference(q, k, v, layer.window_sizes,
                                               is_causal=True))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
