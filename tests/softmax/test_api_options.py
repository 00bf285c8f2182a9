"""Issue 17's dot_product_attention options outside the per-backend suite:
per-example offsets under vmap (decoding at different positions), the
masked-slot rule of layers (`input_live`) with offsets, attention weights
with sinks, and which calls count as using an option a kernel lacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.softmax._common import input_live, prepare
from tests.reference_np import allowed_np, attention_np


def _rand(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_per_example_q_offset_under_vmap(impl):
  """One decode step per example at its own position (T=1 query against a
  cache of S keys, causal with a window), vmapped over examples with the
  position as a traced per-example offset: equals the reference."""
  b, s, n, h = 3, 11, 2, 8
  q, k, v = _rand(0, (b, 1, n, h)), _rand(1, (b, s, n, h)), _rand(2, (b, s, n, h))
  pos = np.array([0, 6, 10])
  f = lambda q, k, v, p: attnjax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(4, 0), q_offset=p,
      implementation=impl)
  out = jax.jit(jax.vmap(f))(q, k, v, jnp.asarray(pos))
  ref = attention_np(q, k, v, is_causal=True, window=(4, 0), q_offset=pos)
  np.testing.assert_allclose(np.asarray(out), ref["out"], atol=2e-5)
  # The same through one batched call with an array offset.
  out2 = attnjax.dot_product_attention(
      q, k, v, is_causal=True, local_window_size=(4, 0),
      q_offset=jnp.asarray(pos), implementation=impl)
  np.testing.assert_allclose(np.asarray(out2), ref["out"], atol=2e-5)


@pytest.mark.parametrize("kw,ref_kw", [
    (dict(is_causal=True, causal_alignment="bottom_right",
          local_window_size=(3, 0)),
     dict(is_causal=True, bottom_right=True, window=(3, 0))),
    (dict(is_causal=True, q_offset=np.array([2, 9]), kv_offset=4,
          local_window_size=(2, 1)),
     dict(is_causal=True, q_offset=np.array([2, 9]), kv_offset=4,
          window=(2, 1))),
])
def test_input_live_follows_the_position_rule(kw, ref_kw):
  """The key positions `input_live` keeps are exactly those some query can
  attend under the same offsets (so layers zero only dead inputs)."""
  b, t, s = 2, 4, 12
  kw = dict(kw)
  if "q_offset" in kw:
    kw["q_offset"] = jnp.asarray(kw["q_offset"])
  live = input_live(b, t, s, **kw)
  want = allowed_np(t, s, batch=b, **ref_kw).any(axis=(1, 2))
  np.testing.assert_array_equal(np.broadcast_to(np.asarray(live), (b, s)),
                                want)


def test_attention_weights_with_sinks():
  """Weights of the keys with a sink: the reference probabilities, each row
  summing to 1 - p_sink."""
  q, k = _rand(3, (2, 5, 3, 8)), _rand(4, (2, 7, 3, 8))
  sinks = jnp.asarray([0.5, -1.0, 2.0])
  w = attnjax.attention_weights(q, k, sinks=sinks, logits_soft_cap=1.5)
  ref = attention_np(q, k, jnp.zeros((2, 7, 3, 1)), sinks=sinks, soft_cap=1.5)
  np.testing.assert_allclose(np.asarray(w), ref["probs"], atol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0 - ref["p_sink"],
                             atol=1e-6)


def test_extensions_name_only_what_changes_the_result():
  """A call uses an option kernels lack only when it matters: bottom-right
  with T == S, or offsets without causal/window, are plain calls."""
  q = jnp.ones((1, 4, 2, 8))
  ext = lambda **kw: prepare(q, q, q, **kw)[0].extensions()
  assert ext(is_causal=True, causal_alignment="bottom_right") == ()
  assert ext(q_offset=3) == ()
  assert ext(precision=None, sinks=None) == ()
  assert len(ext(is_causal=True, q_offset=3)) == 1
  k = jnp.ones((1, 6, 2, 8))
  call = prepare(q, k, k, is_causal=True, causal_alignment="bottom_right",
                 logits_soft_cap=3.0, sinks=jnp.zeros(2),
                 precision="highest")[0]
  assert call.position_shift == 2
  assert len(call.extensions()) == 4
  with pytest.raises(NotImplementedError, match="sinks"):
    attnjax.dot_product_attention(q, q, q, sinks=jnp.zeros(2),
                                  implementation="pallas")
