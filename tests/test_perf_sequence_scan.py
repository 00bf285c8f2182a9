"""Sequence mechanisms that are linear in theory, computed in groups of
positions so that they are linear in practice (issue 22 item 3).

Whole-sequence elementwise passes and contractions over S (the softmax over
key positions, feature maps, the [S, K, H] x [S, K, Hv] context product)
fall out of cache as S grows, and CPU time per element doubled between
S=4096 and 16384. The mechanisms below now loop over groups of positions
(a lax.scan's scanned inputs and outputs), carrying only small per-head
state. Tested here: values and gradients of the grouped paths at lengths
that use several groups, with a ragged last group, key padding, GQA and
cross lengths, float32 and bfloat16, jit and vmap, against the quadratic
`*_reference` functions; fully masked rows are zeros; and the structure:
the forward and backward computations do loop, and no loop carries an
array of sequence length.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import sequence as sq
from attnjax.sequence import efficient
from tests.test_linear_attention_scan import _loop_carries, _subjaxprs

_f32 = lambda x: x.astype(jnp.float32)


def _inputs(b, t, s, n, kh, h, hv, dtype, seed=0, scale=1.0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype) * scale
  k = jax.random.normal(ks[1], (b, s, kh, h), dtype) * scale
  v = jax.random.normal(ks[2], (b, s, kh, hv), dtype)
  w = jax.random.normal(ks[3], (b, t, n, hv), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v, w


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, w):
  """fn(q, k, v) and the gradients of sum(fn(q, k, v) * w), compiled."""
  out, pull = jax.vjp(fn, q, k, v)
  return out, pull(w.astype(out.dtype))


def _key_mask(b, s, drop):
  """[B, 1, 1, S]: batch row 0 drops its last `drop` keys, the last batch
  row (when B > 1) has no valid key at all."""
  m = np.ones((b, 1, 1, s), bool)
  m[0, ..., s - drop:] = False
  if b > 1:
    m[-1] = False
  return jnp.asarray(m)


def _check_f32(fn, ref, q, k, v, w, rtol=1e-4, gtol=2e-3):
  out, grads = _value_and_grads(fn, q, k, v, w)
  want, want_grads = _value_and_grads(ref, q, k, v, w)
  np.testing.assert_allclose(out, want, rtol=rtol, atol=rtol)
  for name, a, b in zip("qkv", grads, want_grads):
    assert np.all(np.isfinite(a)), name
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    np.testing.assert_allclose(a, b, rtol=gtol, atol=gtol * scale,
                               err_msg=name)
  return out, grads


def _check_bf16(fn, ref, q, k, v, w):
  out, grads = _value_and_grads(fn, q, k, v, w)
  want, want_grads = _value_and_grads(ref, _f32(q), _f32(k), _f32(v), w)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(_f32(out), want, rtol=3e-2, atol=3e-2)
  for name, a, b in zip("qkv", grads, want_grads):
    assert a.dtype == jnp.bfloat16, name
    scale = float(jnp.max(jnp.abs(b))) or 1.0
    np.testing.assert_allclose(_f32(a), b, rtol=5e-2, atol=4e-2 * scale,
                               err_msg=name)


def _count_loops(jaxpr):
  """Number of scan/while loops in a jaxpr, recursively."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in ("scan", "while")
    n += sum(_count_loops(sub) for sub in _subjaxprs(eqn.params))
  return n


def _assert_grouped(fn, t, n=2, h=8):
  """fn's forward and backward loop over groups of positions (there are
  loops, in the forward and in the gradient), and no loop carries anything
  of sequence length (B * T * N * H elements)."""
  q, k, v, _ = _inputs(1, t, t, n, n, h, h, jnp.float32)
  fwd = jax.make_jaxpr(fn)(q, k, v).jaxpr
  assert _count_loops(fwd), "expected the forward to loop over groups"
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  grad = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
  assert _count_loops(grad), "expected the gradient to loop over groups"
  carries = _loop_carries(grad)
  assert not carries or max(carries) < t, sorted(carries)[-5:]
  # The whole-sequence work happens inside the loops: no op outside a loop
  # reduces over the sequence axis.
  for eqn in fwd.eqns:
    if eqn.primitive.name in ("reduce_max", "reduce_sum", "dot_general"):
      shapes = [x.aval.shape for x in eqn.invars if hasattr(x, "aval")]
      assert not any(len(sh) > 1 and t in sh for sh in shapes), (eqn, shapes)


# --------------------------------------------------------------------------
# efficient_attention: online softmax over key positions per channel.

# Lengths above 2 * _TOKENS_PER_STEP: several groups and a ragged last one.
_T, _S = 1100, 1300


def test_efficient_lengths_use_several_groups():
  assert _S > 2 * efficient._TOKENS_PER_STEP
  assert _T % efficient._TOKENS_PER_STEP and _S % efficient._TOKENS_PER_STEP


@pytest.mark.parametrize("masked", [False, True])
def test_efficient_values_and_grads_f32(masked):
  q, k, v, w = _inputs(2, _T, _S, 4, 2, 8, 6, jnp.float32, scale=3.0)
  mask = _key_mask(2, _S, 37) if masked else None
  fn = functools.partial(sq.efficient_attention, mask=mask, scale=0.7)
  ref = functools.partial(sq.efficient_attention_reference, mask=mask,
                          scale=0.7)
  out, grads = _check_f32(fn, ref, q, k, v, w)
  if masked:
    # No valid key in batch row 1: zeros, and nothing flows back to it.
    np.testing.assert_array_equal(out[1], 0.0)
    for gr in grads:
      np.testing.assert_array_equal(gr[1], 0.0)


def test_efficient_bf16():
  q, k, v, w = _inputs(1, _T, _S, 2, 2, 8, 8, jnp.bfloat16, seed=1)
  _check_bf16(sq.efficient_attention, sq.efficient_attention_reference,
              q, k, v, w)


def test_efficient_vmap():
  q, k, v, _ = _inputs(3, 700, 1100, 2, 1, 8, 4, jnp.float32, seed=2)
  out = jax.jit(jax.vmap(sq.efficient_attention))(q, k, v)
  want = jnp.stack([sq.efficient_attention_reference(q[i], k[i], v[i])
                    for i in range(3)])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_efficient_large_logits_finite():
  # Key logits up to ~1e3: the running maximum keeps every exp <= 1.
  q, k, v, w = _inputs(1, _T, _S, 2, 2, 8, 4, jnp.float32, seed=3,
                       scale=300.0)
  _check_f32(sq.efficient_attention, sq.efficient_attention_reference,
             q, k, v, w, rtol=1e-3, gtol=1e-2)


def test_efficient_grouped_structure():
  _assert_grouped(sq.efficient_attention, 4096)


# --------------------------------------------------------------------------
# performer_attention (non-causal): exponents and features per group, a
# running per-feature key maximum.

from attnjax.sequence import performer  # noqa: E402

_PROJ = sq.orthogonal_random_features(jax.random.key(7), 32, 8)


def test_performer_lengths_use_several_groups():
  step = performer._TOKENS_PER_STEP
  assert _S > 2 * step and _T % step and _S % step


@pytest.mark.parametrize("masked", [False, True])
def test_performer_values_and_grads_f32(masked):
  q, k, v, w = _inputs(2, _T, _S, 4, 2, 8, 6, jnp.float32, seed=4, scale=2.0)
  mask = _key_mask(2, _S, 37) if masked else None
  fn = functools.partial(sq.performer_attention, projection=_PROJ, mask=mask)
  ref = functools.partial(sq.performer_attention_reference, projection=_PROJ,
                          mask=mask)
  out, grads = _check_f32(fn, ref, q, k, v, w)
  if masked:
    np.testing.assert_array_equal(out[1], 0.0)
    for gr in grads:
      np.testing.assert_array_equal(gr[1], 0.0)


def test_performer_large_inputs_finite():
  # Exponents in the hundreds: per-group features would overflow or
  # underflow without the running maximum and the query shift.
  q, k, v, w = _inputs(1, _T, _S, 2, 2, 8, 4, jnp.float32, seed=5,
                       scale=12.0)
  fn = functools.partial(sq.performer_attention, projection=_PROJ)
  ref = functools.partial(sq.performer_attention_reference, projection=_PROJ)
  _check_f32(fn, ref, q, k, v, w, rtol=2e-3, gtol=2e-2)


def test_performer_bf16():
  q, k, v, w = _inputs(1, _T, _S, 2, 2, 8, 8, jnp.bfloat16, seed=6)
  _check_bf16(functools.partial(sq.performer_attention, projection=_PROJ),
              functools.partial(sq.performer_attention_reference,
                                projection=_PROJ), q, k, v, w)


def test_performer_vmap():
  q, k, v, _ = _inputs(3, 700, 1100, 2, 1, 8, 4, jnp.float32, seed=8)
  fn = functools.partial(sq.performer_attention, projection=_PROJ)
  out = jax.jit(jax.vmap(fn))(q, k, v)
  want = jnp.stack([sq.performer_attention_reference(q[i], k[i], v[i],
                                                     projection=_PROJ)
                    for i in range(3)])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_performer_grouped_structure():
  _assert_grouped(functools.partial(sq.performer_attention,
                                    projection=_PROJ), 4096)


# --------------------------------------------------------------------------
# agent_attention: pooling, agent aggregation (online softmax over keys)
# and broadcast, each per group of positions.

from attnjax.sequence import agent  # noqa: E402


def test_agent_lengths_use_several_groups():
  step = agent._TOKENS_PER_STEP
  assert _S > 2 * step and _T % step and _S % step


@pytest.mark.parametrize("num_agents", [13, 64])
def test_pool_agents_window_means(num_agents):
  # Adaptive average pooling written out in float64 NumPy: agent i is the
  # mean of positions floor(i T / a) .. ceil((i + 1) T / a) - 1.
  q, _, _, _ = _inputs(2, _T, 4, 3, 1, 5, 1, jnp.float32, seed=9)
  got = agent.pool_agents(q, num_agents)
  qn = np.asarray(q, np.float64)
  want = np.stack([qn[:, (i * _T) // num_agents:
                      -(-((i + 1) * _T) // num_agents)].mean(axis=1)
                   for i in range(num_agents)], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_agent_values_and_grads_f32(masked):
  q, k, v, w = _inputs(2, _T, _S, 4, 2, 8, 6, jnp.float32, seed=10,
                       scale=2.0)
  mask = _key_mask(2, _S, 37) if masked else None
  fn = functools.partial(sq.agent_attention, num_agents=13, mask=mask)
  ref = functools.partial(sq.agent_attention_reference, num_agents=13,
                          mask=mask)
  out, grads = _check_f32(fn, ref, q, k, v, w)
  if masked:
    np.testing.assert_array_equal(out[1], 0.0)
    for gr in grads:
      np.testing.assert_array_equal(gr[1], 0.0)


def test_agent_explicit_agents_large_logits():
  q, k, v, w = _inputs(1, _T, _S, 2, 1, 8, 4, jnp.float32, seed=11,
                       scale=20.0)
  ag = jax.random.normal(jax.random.key(12), (1, 7, 2, 8)) * 20.0
  fn = functools.partial(sq.agent_attention, agents=ag)
  ref = functools.partial(sq.agent_attention_reference, agents=ag)
  _check_f32(fn, ref, q, k, v, w, rtol=1e-3, gtol=1e-2)


def test_agent_bf16():
  q, k, v, w = _inputs(1, _T, _S, 2, 2, 8, 8, jnp.bfloat16, seed=13)
  _check_bf16(functools.partial(sq.agent_attention, num_agents=16),
              functools.partial(sq.agent_attention_reference, num_agents=16),
              q, k, v, w)


def test_agent_vmap():
  q, k, v, _ = _inputs(3, 700, 1100, 2, 1, 8, 4, jnp.float32, seed=14)
  fn = functools.partial(sq.agent_attention, num_agents=8)
  out = jax.jit(jax.vmap(fn))(q, k, v)
  want = jnp.stack([sq.agent_attention_reference(q[i], k[i], v[i],
                                                 num_agents=8)
                    for i in range(3)])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_agent_grouped_structure():
  _assert_grouped(functools.partial(sq.agent_attention, num_agents=16), 4096)


# --------------------------------------------------------------------------
# sliding_window_attention ('xla'): query blocks scanned with their key
# windows (static shifted slices) as scanned inputs; nothing gathered, no
# full-size cotangent carried through the backward loop.

from attnjax.sequence import sparse  # noqa: E402

# (window_size, is_causal, block_size): the bench's causal w=128 block 128
# (2 key blocks per query block), a two-sided band with the default block
# (4 blocks), and one wider than _BAND_STACK_MAX_BLOCKS (gathered path).
_BANDS = [(128, True, 128), ((100, 37), False, None), ((5, 300), False, 64)]


def test_sliding_band_block_counts():
  def top(ws, bs):
    left, right = (ws, ws) if isinstance(ws, int) else ws
    return (bs - 1 + right) // bs + (left + bs - 1) // bs + 1
  assert top((128, 0), 128) == 2 and top((100, 37), 64) == 4  # causal: right=0
  assert top((5, 300), 64) > sparse._BAND_STACK_MAX_BLOCKS


@pytest.mark.parametrize("window,causal,block", _BANDS)
@pytest.mark.parametrize("t,s", [(1100, 1300), (1300, 700)])
def test_sliding_values_and_grads_f32(window, causal, block, t, s):
  q, k, v, w = _inputs(2, t, s, 4, 2, 8, 6, jnp.float32, seed=15)
  mask = _key_mask(2, s, 37)
  fn = functools.partial(sq.sliding_window_attention, window_size=window,
                         is_causal=causal, block_size=block, mask=mask)
  ref = functools.partial(sq.sliding_window_attention_reference,
                          window_size=window, is_causal=causal, mask=mask)
  out, grads = _check_f32(fn, ref, q, k, v, w, rtol=1e-5, gtol=1e-4)
  np.testing.assert_array_equal(out[1], 0.0)
  for gr in grads:
    np.testing.assert_array_equal(gr[1], 0.0)


def test_sliding_bf16():
  q, k, v, w = _inputs(1, 1100, 1100, 2, 2, 8, 8, jnp.bfloat16, seed=16)
  _check_bf16(
      functools.partial(sq.sliding_window_attention, window_size=128,
                        is_causal=True, block_size=128),
      functools.partial(sq.sliding_window_attention_reference,
                        window_size=128, is_causal=True), q, k, v, w)


def test_sliding_vmap():
  q, k, v, _ = _inputs(3, 700, 700, 2, 1, 8, 4, jnp.float32, seed=17)
  fn = functools.partial(sq.sliding_window_attention, window_size=(60, 10),
                         block_size=32)
  out = jax.jit(jax.vmap(fn))(q, k, v)
  want = jnp.stack([sq.sliding_window_attention_reference(
      q[i], k[i], v[i], window_size=(60, 10)) for i in range(3)])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,causal,block", _BANDS[:2])
def test_sliding_grouped_structure(window, causal, block):
  _assert_grouped(functools.partial(
      sq.sliding_window_attention, window_size=window, is_causal=causal,
      block_size=block), 4096)


def test_agent_grad_wrt_explicit_agents():
  # Learned agents are closed over by the loops: their gradient is
  # accumulated across groups.
  q, k, v, w = _inputs(1, _T, _S, 2, 1, 8, 4, jnp.float32, seed=18)
  ag = jax.random.normal(jax.random.key(19), (1, 7, 2, 8))
  mask = _key_mask(1, _S, 37)

  def loss(f, ag):
    return jnp.sum(f(q, k, v, agents=ag, mask=mask) * w)
  got = jax.jit(jax.grad(functools.partial(loss, sq.agent_attention)))(ag)
  want = jax.grad(functools.partial(loss, sq.agent_attention_reference))(ag)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
