"""Softmax attention under the three strict JAX modes (issue 15).

`jax_numpy_rank_promotion='raise'`, `jax_numpy_dtype_promotion='strict'` and
`jax.debug_infs(True)` (tests/strict_modes.py) each broke some backend:
`masks.and_masks` broadcast rank 2 with rank 4, 'chunked' with a boolean
mask and a key length that is not a multiple of its block, 'xla' multiplied
float weights by a bool row mask and wrote -inf into the logits.

Here every backend runs representative calls of the public API -- all mask
kinds combined, values and gradients against the float64 reference, the
lse, dropout, `attention_weights`, the mask builders, `MultiHeadAttention`
-- under each mode. The whole shared suite can also run under a mode:
`ATTNJAX_STRICT_MODE=<mode> pytest tests/test_softmax.py` (see
tests/softmax_base.py); `TestXlaStrict*` below (marked slow) run it for 'xla'.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from attnjax import masks as M
from attnjax.nn import MultiHeadAttention
from tests.reference_np import attention_np
from tests.softmax_base import SoftmaxAttentionSuite
from tests.strict_modes import STRICT_MODES, modes_for_this_run, strict_mode

BACKENDS = ["xla", "chunked", "pallas"]
# Each strict mode separately; under CI the three at once (strict_modes.py:
# a mode only adds errors, so 'all' fails exactly where one of them would).
MODES = modes_for_this_run()
B, T, S, N, K, H = 2, 11, 21, 4, 2, 8   # S not a multiple of any block


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, S, K, H)), dtype)
  return q, k, v


def _combined_case():
  rng = np.random.default_rng(3)
  mask = rng.random((B, 1, T, S)) < 0.8          # rank 4
  window = np.asarray(M.local_window_mask(T, S, (6, 3)))   # rank 2
  qs = np.sort(rng.integers(0, 2, (B, T)), axis=1)
  ks = np.sort(rng.integers(0, 2, (B, S)), axis=1)
  ql, kl = np.array([T, 8]), np.array([S - 3, S])
  kw = dict(is_causal=True, local_window_size=(6, 3),
            q_segment_ids=jnp.asarray(qs), kv_segment_ids=jnp.asarray(ks),
            query_seq_lengths=jnp.asarray(ql),
            key_value_seq_lengths=jnp.asarray(kl))
  ref_kw = dict(is_causal=True, window=(6, 3), q_segment_ids=qs,
                kv_segment_ids=ks, q_lengths=ql, kv_lengths=kl)
  del window
  return jnp.asarray(mask), kw, ref_kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_combined_masks_values_and_grads(mode, backend):
  q, k, v = _inputs()
  mask, kw, ref_kw = _combined_case()
  dout = jnp.asarray(np.random.default_rng(4).standard_normal((B, T, N, H)),
                     jnp.float32)
  ref = attention_np(q, k, v, mask=mask, dout=dout, **ref_kw)
  f = functools.partial(attnjax.dot_product_attention, implementation=backend,
                        **kw)
  with strict_mode(mode):
    out = f(q, k, v, mask=mask)
    out_jit = jax.jit(lambda q, k, v: f(q, k, v, mask=mask))(q, k, v)
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, mask=mask) * dout),
                     argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, ref["out"], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(out_jit, ref["out"], atol=2e-5, rtol=2e-5)
  for name, g in zip(("dq", "dk", "dv"), grads):
    np.testing.assert_allclose(g, ref[name], atol=2e-4, rtol=2e-4,
                               err_msg=name)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_mask_and_causal_with_bias_and_lse(mode, backend):
  """A rank-2 bool mask with causal (and_masks of rank 2 and 4), a bias,
  bf16 inputs, and the lse (no empty rows, so no -inf is legitimate)."""
  q, k, v = _inputs(1, jnp.bfloat16)
  rng = np.random.default_rng(5)
  mask = rng.random((T, S)) < 0.7
  mask[:, 0] = True
  bias = jnp.asarray(rng.standard_normal((1, N, T, S)), jnp.float32)
  ref = attention_np(q, k, v, bias, mask=mask, is_causal=True)
  with strict_mode(mode):
    out, lse = attnjax.dot_product_attention_with_lse(
        q, k, v, bias, jnp.asarray(mask), is_causal=True,
        implementation=backend)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref["out"],
                             atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(lse, ref["lse"], atol=5e-2)


@pytest.mark.parametrize("backend", ["xla", "chunked"])
@pytest.mark.parametrize("mode", MODES)
def test_dropout_and_fully_masked_rows(mode, backend):
  q, k, v = _inputs(2)
  lengths = jnp.asarray([0, 9])     # batch row 0 has nothing to attend to
  with strict_mode(mode):
    out = attnjax.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, dropout_rate=0.25,
        dropout_rng=jax.random.key(0), implementation=backend)
    g = q
    if backend == "chunked":   # its own backward (hash-regenerated masks)
      g = jax.grad(lambda q: jnp.sum(attnjax.dot_product_attention(
          q, k, v, key_value_seq_lengths=lengths, dropout_rate=0.25,
          dropout_rng=jax.random.key(0), implementation=backend)))(q)
  assert np.all(np.asarray(out[0]) == 0.0)
  assert np.all(np.isfinite(np.asarray(out))) and np.all(np.isfinite(g))
  # Dropout keeps the expectation: compare with the undropped reference
  # loosely (mean over many weights), and exactly zero on the empty row.
  ref = attention_np(q, k, v, kv_lengths=np.array([0, 9]))["out"]
  assert np.abs(np.asarray(out[1]) - ref[1]).mean() < 0.5


@pytest.mark.parametrize("mode", MODES)
def test_attention_weights_masks_and_layer(mode):
  q, k, _ = _inputs(6)
  mask, kw, ref_kw = _combined_case()
  ref = attention_np(q, k, k, mask=mask, **ref_kw)
  layer = MultiHeadAttention(2, 8, head_dim=4, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(7).standard_normal((B, T, 8)),
                  jnp.float32)
  xkv = jnp.asarray(np.random.default_rng(8).standard_normal((B, S, 8)),
                    jnp.float32)
  with strict_mode(mode):
    w = attnjax.attention_weights(q, k, mask=mask, **kw)
    m2 = M.and_masks(M.causal_mask(T, S), mask,
                     M.padding_mask(T, S, kv_lengths=jnp.asarray([3, S])))
    m3 = M.or_masks(M.local_window_mask(T, S, 2), M.segment_mask(
        kw["q_segment_ids"], kw["kv_segment_ids"]))
    y = layer(x, xkv, is_causal=True, attention_kwargs=dict(
        key_value_seq_lengths=jnp.asarray([S, 5]),
        implementation="xla"))
    gy = nnx.grad(lambda m: jnp.sum(m(x, xkv, mask=mask, attention_kwargs=dict(
        implementation="chunked"))))(layer)
  np.testing.assert_allclose(w, ref["probs"], atol=2e-6)
  assert m2.shape == (B, 1, T, S) and m3.shape == (B, 1, T, S)
  ref_m2 = (np.arange(S)[None, :] <= np.arange(T)[:, None]) & np.asarray(mask) \
      & (np.arange(S) < np.array([3, S])[:, None])[:, None, None, :]
  np.testing.assert_array_equal(m2, ref_m2)
  assert y.shape == (B, T, 8) and np.all(np.isfinite(y))
  assert all(np.all(np.isfinite(np.asarray(x_)))
             for x_ in jax.tree.leaves(nnx.state(gy)))


@pytest.mark.parametrize("mode", STRICT_MODES + ("all",))
def test_each_mode_and_all_raise_where_they_should(mode):
  """'all' (what CI runs the strict tests under) turns on each of the three
  modes: it raises on an implicit rank broadcast, an implicit dtype
  promotion and an inf, and each single mode raises on its own."""
  x, row, flag = jnp.ones((2, 3)), jnp.ones(3), jnp.ones(3, bool)
  offences = {
      "rank_promotion": (lambda: x + row, ValueError),
      "dtype_promotion": (lambda: row * flag, jax.dtypes.TypePromotionError),
      "debug_infs": (lambda: jax.jit(jnp.log)(row - 1.0), FloatingPointError),
  }
  for name, (offend, err) in offences.items():
    with strict_mode(mode):
      if mode in (name, "all"):
        with pytest.raises(err):
          offend()
      else:
        offend()


# The whole shared suite under each strict mode, for the reference backend
# (the cheapest; the other backends run the representative calls above and,
# with ATTNJAX_STRICT_MODE set, their own full suites). Under CI the three
# modes at once: tests/test_softmax.py's TestXla itself runs under 'all'
# there (a mode only adds errors, so that one class fails wherever a plain
# or a single-mode run would); locally one class per mode here.
if not os.environ.get("CI"):
  @pytest.mark.slow
  class TestXlaStrictRankPromotion(SoftmaxAttentionSuite):
    implementation = "xla"
    supports_dropout = True
    strict_mode = "rank_promotion"

  @pytest.mark.slow
  class TestXlaStrictDtypePromotion(SoftmaxAttentionSuite):
    implementation = "xla"
    supports_dropout = True
    strict_mode = "dtype_promotion"

  @pytest.mark.slow
  class TestXlaStrictDebugInfs(SoftmaxAttentionSuite):
    implementation = "xla"
    supports_dropout = True
    strict_mode = "debug_infs"
