"""Softmax attention backends run the shared suite (tests/softmax_base.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax
from attnjax.softmax import chunked_dot_product_attention
from tests.conftest import gpu_available
from tests.reference_np import attention_np
from tests.softmax_base import SoftmaxAttentionSuite
from tests.strict_modes import ALL


class TestXla(SoftmaxAttentionSuite):
  """The reference backend. Under CI it runs under the three strict modes
  at once ('all'; tests/strict_modes.py): a mode only adds errors and the
  library never branches on them, so this one run makes every assertion a
  plain run makes and the strict ones too (it replaces the plain run plus
  test_strict_modes' separate 'all' class, the same compiles twice)."""
  implementation = "xla"
  supports_dropout = True
  strict_mode = ALL if os.environ.get("CI") else None


class TestChunkedSmallBlocks(SoftmaxAttentionSuite):
  """Blocks far smaller than the sequences: many blocks, ragged tails."""
  supports_dropout = True

  def attention(self, q, k, v, bias=None, mask=None, **kw):
    return chunked_dot_product_attention(q, k, v, bias, mask, block_q=8,
                                         block_kv=8, **kw)

  def attention_with_lse(self, q, k, v, bias=None, mask=None, **kw):
    return chunked_dot_product_attention(q, k, v, bias, mask, block_q=8,
                                         block_kv=8, return_lse=True, **kw)


@pytest.mark.parametrize("is_causal", [False, True])
def test_chunked_default_blocks_values_and_grads(is_causal):
  """implementation='chunked' with its default (capped) block sizes."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.standard_normal((2, 37, 4, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 45, 2, 16)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 45, 2, 16)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((2, 37, 4, 16)), jnp.float32)
  f = lambda q, k, v: jnp.sum(attnjax.dot_product_attention(
      q, k, v, is_causal=is_causal, implementation="chunked") * dout)
  ref = attention_np(q, k, v, is_causal=is_causal, dout=dout)
  np.testing.assert_allclose(
      attnjax.dot_product_attention(q, k, v, is_causal=is_causal,
                                    implementation="chunked"),
      ref["out"], atol=2e-5)
  for g, name in zip(jax.grad(f, argnums=(0, 1, 2))(q, k, v),
                     ("dq", "dk", "dv")):
    np.testing.assert_allclose(g, ref[name], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not gpu_available(), reason="cuDNN attention needs a GPU")
class TestCudnn(SoftmaxAttentionSuite):
  implementation = "cudnn"
  bf16_only = True
  supports_lse = False
  supports_segment_ids = False
  supports_value_head_dim = False
  supports_soft_cap = supports_sinks = False      # jax.nn has neither
  supports_positions = supports_precision = False


def test_cudnn_refuses_on_cpu_with_reason():
  if gpu_available():
    pytest.skip("GPU present")
  q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="GPU"):
    attnjax.dot_product_attention(q, q, q, implementation="cudnn")


def test_unknown_implementation_is_value_error():
  q = jnp.ones((1, 4, 2, 8))
  with pytest.raises(ValueError, match="implementation"):
    attnjax.dot_product_attention(q, q, q, implementation="nope")


def test_auto_picks_chunked_for_long_sequences():
  # 1 x 8 x 8192 x 8192 float32 logits = 2 GiB > limit: the auto path must
  # not materialize them. We check the compiled memory, not run it.
  q = jax.ShapeDtypeStruct((1, 8192, 8, 64), jnp.float32)
  f = jax.jit(lambda q, k, v: attnjax.dot_product_attention(q, k, v))
  mem = f.lower(q, q, q).compile().memory_analysis()
  assert mem.temp_size_in_bytes < (1 << 30)


def test_auto_matches_reference():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32)
  out = attnjax.dot_product_attention(q, q, q, is_causal=True)
  ref = attention_np(q, q, q, is_causal=True)["out"]
  np.testing.assert_allclose(out, ref, atol=2e-5)


def test_dropout_xla_statistics_and_determinism():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
  v = jnp.ones((1, 16, 2, 8), jnp.float32)
  key = jax.random.key(3)
  a = attnjax.dot_product_attention(q, q, v, dropout_rate=0.5, dropout_rng=key,
                                    implementation="xla")
  b = attnjax.dot_product_attention(q, q, v, dropout_rate=0.5, dropout_rng=key,
                                    implementation="xla")
  np.testing.assert_array_equal(a, b)
  # With value = 1 the output is sum of kept weights / (1 - rate): mean ~ 1.
  w = attnjax.attention_weights(q, q)
  keep = jax.random.bernoulli(key, 0.5, w.shape)
  expected = jnp.einsum("bnts->btn", jnp.where(keep, w / 0.5, 0.0))
  np.testing.assert_allclose(a[..., 0], expected, atol=1e-5)
  assert abs(float(a.mean()) - 1.0) < 0.2
  with pytest.raises(ValueError, match="dropout_rng"):
    attnjax.dot_product_attention(q, q, v, dropout_rate=0.5)


def _chunked_dropout_reference(q, k, v, bias, key, rate, is_causal):
  """Dense softmax attention with the full keep mask of the chunked backend
  (`dropout_keep_mask`), plain autodiff through it."""
  from attnjax.softmax.chunked import dropout_keep_mask
  b, t, n, _ = q.shape
  s, nkv = k.shape[1], k.shape[2]
  g = n // nkv
  keep = dropout_keep_mask(key, rate, b, n, t, s)
  kr = jnp.repeat(k, g, axis=2)
  vr = jnp.repeat(v, g, axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, kr,
                      precision=jax.lax.Precision.HIGHEST) / np.sqrt(q.shape[-1])
  logits = logits + bias
  if is_causal:
    logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1)
  w = jnp.where(keep, w / (1.0 - rate), 0.0)
  return jnp.einsum("bnts,bsnh->btnh", w, vr,
                    precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_chunked_matches_dense_with_same_mask(is_causal):
  rng = np.random.default_rng(7)
  b, t, s, n, nkv, h = 2, 37, 37 if is_causal else 45, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, nkv, h)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, nkv, h)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal((n, t, s)), jnp.float32)
  dout = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  key, rate = jax.random.key(11), 0.3
  f = lambda q, k, v, bias: chunked_dot_product_attention(
      q, k, v, bias, block_q=8, block_kv=16, is_causal=is_causal,
      dropout_rate=rate, dropout_rng=key)
  r = lambda q, k, v, bias: _chunked_dropout_reference(
      q, k, v, bias, key, rate, is_causal)

  # Everything compiled (eager autodiff through the chunked loops compiles
  # dozens of small programs): values and grads of each side in one
  # jit(vjp); the grads are those of sum(out * dout) (= vjp(dout)).
  def vjp(fn):
    return jax.jit(lambda *a: (lambda o, pull: (o, pull(dout)))(
        *jax.vjp(fn, *a)))
  out = jax.jit(f)(q, k, v, bias)
  out2, got = vjp(f)(q, k, v, bias)
  want_out, want = vjp(r)(q, k, v, bias)
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  # Dropout is really applied (not the undropped output) and repeatable
  # (a second, different program: the forward inside the vjp).
  plain = jax.jit(lambda q, k, v, bias: chunked_dot_product_attention(
      q, k, v, bias, block_q=8, block_kv=16, is_causal=is_causal))(
          q, k, v, bias)
  assert float(jnp.max(jnp.abs(out - plain))) > 0.1
  np.testing.assert_array_equal(out, out2)
  # The mask is a function of positions: other block sizes, same numbers.
  other = jax.jit(lambda q, k, v, bias: chunked_dot_product_attention(
      q, k, v, bias, block_q=16, block_kv=8, is_causal=is_causal,
      dropout_rate=rate, dropout_rng=key))(q, k, v, bias)
  np.testing.assert_allclose(other, out, atol=2e-6, rtol=2e-6)
  for a, w, nm in zip(got, want, ("dq", "dk", "dv", "dbias")):
    np.testing.assert_allclose(a, w, atol=1e-4, rtol=1e-4, err_msg=nm)


def test_dropout_keep_mask_statistics():
  # Keep rate, and no structure along rows, columns, heads or keys: the
  # agreement of neighbouring decisions must be that of independent coins,
  # p^2 + (1 - p)^2, for rates 0.1 and 0.5.
  from attnjax.softmax.chunked import dropout_keep_mask
  for rate in (0.1, 0.5):
    m = np.asarray(dropout_keep_mask(jax.random.key(0), rate, 2, 4, 256, 256))
    p = 1.0 - rate
    assert abs(m.mean() - p) < 0.004
    agree = p * p + (1 - p) ** 2
    for a, b in ((m[..., 1:], m[..., :-1]), (m[..., 1:, :], m[..., :-1, :]),
                 (m[:, 1:], m[:, :-1]), (m[1:], m[:-1]),
                 (m[..., 1:, 1:], m[..., :-1, :-1])):
      assert abs((a == b).mean() - agree) < 0.006
    m2 = np.asarray(dropout_keep_mask(jax.random.key(1), rate, 2, 4, 256, 256))
    assert abs((m == m2).mean() - agree) < 0.006


def test_dropout_chunked_statistics():
  # value = 1: each output is (sum of kept weights) / (1 - rate), mean 1;
  # the kept fraction over all weights is 1 - rate.
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((1, 64, 4, 8)), jnp.float32)
  v = jnp.ones((1, 64, 4, 8), jnp.float32)
  out = attnjax.dot_product_attention(
      q, q, v, dropout_rate=0.25, dropout_rng=jax.random.key(0),
      implementation="chunked")
  assert abs(float(out.mean()) - 1.0) < 0.05
  other = attnjax.dot_product_attention(
      q, q, v, dropout_rate=0.25, dropout_rng=jax.random.key(1),
      implementation="chunked")
  assert not np.array_equal(np.asarray(out), np.asarray(other))


def test_attention_weights_match_reference():
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32)
  w = attnjax.attention_weights(q, k, is_causal=True, local_window_size=(3, 0))
  ref = attention_np(q, k, k, is_causal=True, window=(3, 0))["probs"]
  np.testing.assert_allclose(w, ref, atol=1e-6)
  np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-6)


def test_chunked_causal_skips_blocks():
  """Causal chunked attention visits about half the blocks (loop bounds)."""
  # Count logits-einsum executions through the FLOP estimate of the compiled
  # while loops is backend-specific; instead check values with blocks where
  # whole key blocks are invisible to whole query blocks (window << block).
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.standard_normal((1, 64, 2, 8)), jnp.float32)
  out = chunked_dot_product_attention(q, q, q, block_q=8, block_kv=8,
                                      local_window_size=(2, 0))
  ref = attention_np(q, q, q, window=(2, 0))["out"]
  np.testing.assert_allclose(out, ref, atol=2e-5)


# --------------------------------------------- clear errors, not crashes
_SMALL = dict(b=2, t=5, s=7, n=2, k=1, h=4)


def _small(seed=0):
  rng = np.random.default_rng(seed)
  d = _SMALL
  q = jnp.asarray(rng.standard_normal((d["b"], d["t"], d["n"], d["h"])),
                  jnp.float32)
  k = jnp.asarray(rng.standard_normal((d["b"], d["s"], d["k"], d["h"])),
                  jnp.float32)
  v = jnp.asarray(rng.standard_normal((d["b"], d["s"], d["k"], d["h"])),
                  jnp.float32)
  return q, k, v


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_numpy_integer_scalars_accepted(impl):
  q, k, v = _small()
  f = lambda **kw: np.asarray(attnjax.dot_product_attention(
      q, k, v, implementation=impl, **kw))
  np.testing.assert_array_equal(f(local_window_size=np.int64(2)),
                                f(local_window_size=2))
  np.testing.assert_array_equal(
      f(local_window_size=(np.int32(3), jnp.int32(1))),
      f(local_window_size=(3, 1)))
  np.testing.assert_array_equal(
      f(key_value_seq_lengths=np.array([np.int64(3), np.int64(7)])),
      f(key_value_seq_lengths=jnp.asarray([3, 7])))
  ref = attention_np(q, k, v, window=(3, 1))["out"]
  np.testing.assert_allclose(f(local_window_size=(np.int64(3), 1)), ref,
                             atol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_unbounded_window_does_not_overflow(impl):
  q, k, v = _small(1)
  ref = attention_np(q, k, v)["out"]
  for w in (2**31, (2**31, 2**31), (2**40, 0)):
    out = attnjax.dot_product_attention(q, k, v, local_window_size=w,
                                        implementation=impl)
    r = ref if w != (2**40, 0) else attention_np(q, k, v,
                                                 is_causal=True)["out"]
    np.testing.assert_allclose(out, r, atol=2e-5)
  w = attnjax.attention_weights(q, k, local_window_size=2**31)
  np.testing.assert_allclose(w, attention_np(q, k, v)["probs"], atol=2e-6)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_python_lists_are_converted(impl):
  q, k, v = _small(2)
  out = attnjax.dot_product_attention(
      np.asarray(q).tolist(), np.asarray(k).tolist(), np.asarray(v).tolist(),
      implementation=impl)
  np.testing.assert_allclose(out, attention_np(q, k, v)["out"], atol=2e-5)
  w = attnjax.attention_weights(np.asarray(q).tolist(),
                                np.asarray(k).tolist())
  np.testing.assert_allclose(w, attention_np(q, k, v)["probs"], atol=2e-6)
  with pytest.raises(TypeError, match="query"):
    attnjax.dot_product_attention("q", k, v, implementation=impl)
  with pytest.raises(TypeError, match="value"):
    attnjax.dot_product_attention(q, k, {"v": 1}, implementation=impl)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
@pytest.mark.parametrize("kw, needle", [
    (dict(scale=float("nan")), "scale"),
    (dict(scale=float("inf")), "scale"),
    (dict(local_window_size=(2.5, 2.5)), "local_window_size"),  # truncated
    (dict(local_window_size=2.0), "local_window_size"),
    (dict(local_window_size=(1, True)), "local_window_size"),
    (dict(dropout_rate=float("nan")), "dropout_rate"),
    (dict(dropout_rate=-0.5, dropout_rng=jax.random.key(0)), "dropout_rate"),
])
def test_bad_arguments_name_the_argument(impl, kw, needle):
  q, k, v = _small()
  with pytest.raises((ValueError, TypeError), match=needle):
    attnjax.dot_product_attention(q, k, v, implementation=impl, **kw)
  with pytest.raises((ValueError, TypeError), match=needle):
    attnjax.dot_product_attention_with_lse(q, k, v, implementation=impl, **kw)


def test_chunked_empty_inputs_do_not_mention_block_sizes():
  """T = 0 / S = 0 / B = 0 through the default-block 'chunked' path and the
  explicit-block entry: zeros of the right shape (was a ValueError about
  block sizes the caller never passed)."""
  for b, t, s in ((0, 5, 7), (2, 0, 7), (2, 5, 0)):
    q = jnp.ones((b, t, 2, 4))
    kv = jnp.ones((b, s, 1, 4))
    out = attnjax.dot_product_attention(q, kv, kv, implementation="chunked")
    assert out.shape == (b, t, 2, 4) and not np.any(np.asarray(out))
    out, lse = chunked_dot_product_attention(q, kv, kv, return_lse=True)
    assert out.shape == (b, t, 2, 4) and lse.shape == (b, 2, t)
    assert np.all(np.isneginf(np.asarray(lse)))
  with pytest.raises(ValueError, match="block_q"):
    chunked_dot_product_attention(q, kv, kv, block_q=0)
  with pytest.raises(ValueError, match="block_kv"):
    chunked_dot_product_attention(q, kv, kv, block_kv=2.5)
