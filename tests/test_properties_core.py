"""Property-based checks (hypothesis) of the softmax core (issue 15).

Draws shapes (GQA/MQA included), dtypes, causal / local windows, sequence
lengths, boolean masks with dead columns, NaN/Inf placements in key/value
slots no query may attend, and bad arguments, for
`attnjax.dot_product_attention` ('xla', 'chunked', 'pallas'),
`attnjax.attention_weights` and `attnjax.MultiHeadAttention`. Asserts:
  * values match the float64 reference (tests/reference_np.py);
  * no NaN/Inf in the output where the reference has none;
  * masked-slot invariance: NaN/Inf planted in slots that a masking
    component rules out for every query (past `key_value_seq_lengths`, an
    all-False mask column, right of every query's causal/window reach)
    changes no output and no gradient, and the gradients there are zero;
  * invalid arguments raise ValueError/TypeError naming the argument.

Example counts are bounded (profile 'ci' when $CI is set, else 'dev'); the
'pallas' property runs fewer examples (interpret mode is slow).
"""

from __future__ import annotations

import functools
import os

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attnjax
from tests.reference_np import allowed_np, attention_np

hypothesis.settings.register_profile(
    "attnjax_core_ci", max_examples=4, deadline=None, derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck))
hypothesis.settings.register_profile(
    "attnjax_core_dev", max_examples=15, deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck))
_PROFILE = hypothesis.settings.get_profile(
    "attnjax_core_ci" if os.environ.get("CI") else "attnjax_core_dev")


def _n(profile_examples):
  return hypothesis.settings(_PROFILE, max_examples=profile_examples)


@st.composite
def attention_case(draw, max_len=12):
  b = draw(st.integers(1, 2))
  t = draw(st.integers(1, max_len))
  s = draw(st.integers(1, max_len + 2))
  kh = draw(st.sampled_from([1, 2]))
  g = draw(st.sampled_from([1, 2, 3]))
  h = draw(st.sampled_from([4, 8]))
  dtype = draw(st.sampled_from(["float32", "bfloat16"]))
  causal = draw(st.booleans())
  window = draw(st.one_of(st.none(), st.tuples(st.integers(0, 6),
                                               st.integers(0, 6))))
  use_kl = draw(st.booleans())
  kl = np.array(draw(st.lists(st.integers(0, s), min_size=b, max_size=b)))
  use_ql = draw(st.booleans())
  ql = np.array(draw(st.lists(st.integers(0, t), min_size=b, max_size=b)))
  use_mask = draw(st.booleans())
  seed = draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  mask = None
  if use_mask:
    mask = rng.random((b, 1, t, s)) < 0.75
    dead_cols = rng.random((b, s)) < 0.3
    mask &= ~dead_cols[:, None, None, :]
  planted = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
  return dict(b=b, t=t, s=s, n=kh * g, kh=kh, h=h, dtype=dtype,
              causal=causal, window=window, kl=kl if use_kl else None,
              ql=ql if use_ql else None, mask=mask, seed=seed,
              planted=planted)


def _arrays(c):
  rng = np.random.default_rng(c["seed"])
  dt = jnp.dtype(c["dtype"])
  q = jnp.asarray(rng.standard_normal((c["b"], c["t"], c["n"], c["h"])), dt)
  k = np.asarray(rng.standard_normal((c["b"], c["s"], c["kh"], c["h"])),
                 np.float32)
  v = np.asarray(rng.standard_normal((c["b"], c["s"], c["kh"], c["h"])),
                 np.float32)
  return q, k, v


def _kwargs(c):
  kw, ref_kw = {}, {}
  if c["causal"]:
    kw["is_causal"] = ref_kw["is_causal"] = True
  if c["window"] is not None:
    kw["local_window_size"] = c["window"]
    ref_kw["window"] = c["window"]
  if c["kl"] is not None:
    kw["key_value_seq_lengths"] = jnp.asarray(c["kl"])
    ref_kw["kv_lengths"] = c["kl"]
  if c["ql"] is not None:
    kw["query_seq_lengths"] = jnp.asarray(c["ql"])
    ref_kw["q_lengths"] = c["ql"]
  if c["mask"] is not None:
    kw["mask"] = jnp.asarray(c["mask"])
    ref_kw["mask"] = c["mask"]
  return kw, ref_kw


def _dead_slots(c):
  """[B, S]: key slots one masking component rules out for every query."""
  b, t, s = c["b"], c["t"], c["s"]
  j = np.arange(s)[None, :]
  dead = np.zeros((b, s), bool)
  if c["kl"] is not None:
    dead |= j >= c["kl"][:, None]
  if c["mask"] is not None:
    dead |= ~c["mask"][:, 0].any(axis=1)
  right = np.inf if c["window"] is None else c["window"][1]
  if c["causal"]:
    right = min(right, 0)
  if np.isfinite(right):
    last = (np.full(b, t) if c["ql"] is None else c["ql"]) - 1
    dead |= j > last[:, None] + right
  return dead


def _tols(dtype):
  return (2e-5, 2e-4) if dtype == "float32" else (3e-2, 8e-2)


def _check_backend(c, impl):
  q, k, v = _arrays(c)
  dt = q.dtype
  kw, ref_kw = _kwargs(c)
  dout = jnp.asarray(np.random.default_rng(1).standard_normal(
      (c["b"], c["t"], c["n"], c["h"])), jnp.float32)
  ref = attention_np(q, jnp.asarray(k, dt), jnp.asarray(v, dt), dout=dout,
                     **ref_kw)
  f = functools.partial(attnjax.dot_product_attention, implementation=impl,
                        **kw)

  # Output and gradients of sum(out * dout) in one compiled program (eager
  # autodiff compiles a dozen small ones per drawn shape); the clean and the
  # planted inputs run through the same program.
  @jax.jit
  def values_and_grads(q, k, v):
    out, pull = jax.vjp(lambda q, k, v: f(q, k, v).astype(jnp.float32),
                        q, k, v)
    return out, pull(dout)

  def run(k, v):
    out, grads = values_and_grads(q, jnp.asarray(k, dt), jnp.asarray(v, dt))
    return np.asarray(out, np.float32), [np.asarray(g, np.float32)
                                         for g in grads]

  out, grads = run(k, v)
  atol, gtol = _tols(c["dtype"])
  assert np.all(np.isfinite(out))          # the reference is always finite
  np.testing.assert_allclose(out, ref["out"], atol=atol, rtol=atol)
  for name, g in zip(("dq", "dk", "dv"), grads):
    assert np.all(np.isfinite(g)), name
    err = np.linalg.norm(g - ref[name]) / max(np.linalg.norm(ref[name]), 1.0)
    assert err < gtol, (name, err)
  dead = _dead_slots(c)
  if not dead.any():
    return
  kb, vb = k.copy(), v.copy()
  kb[dead] = c["planted"]
  vb[dead] = np.nan if np.isfinite(c["planted"]) else c["planted"]
  out_b, grads_b = run(kb, vb)
  np.testing.assert_array_equal(out_b, out)
  for name, gb, g in zip(("dq", "dk", "dv"), grads_b, grads):
    assert np.all(np.isfinite(gb)), name
    np.testing.assert_allclose(gb, g, atol=1e-6, rtol=1e-6, err_msg=name)
  assert np.all(grads_b[1][dead] == 0) and np.all(grads_b[2][dead] == 0)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_dot_product_attention_properties(impl):
  @_n(_PROFILE.max_examples)
  @hypothesis.given(c=attention_case())
  def prop(c):
    _check_backend(c, impl)
  prop()


def test_pallas_properties():
  @_n(max(2, _PROFILE.max_examples // 3))
  @hypothesis.given(c=attention_case(max_len=9))
  def prop(c):
    _check_backend(c, "pallas")
  prop()


@_n(_PROFILE.max_examples)
@hypothesis.given(c=attention_case())
def test_attention_weights_properties(c):
  q, k, _ = _arrays(c)
  kw, ref_kw = _kwargs(c)
  ref = attention_np(q, jnp.asarray(k, q.dtype), jnp.asarray(k, q.dtype),
                     **ref_kw)
  dead = _dead_slots(c)
  kb = k.copy()
  kb[dead] = c["planted"]
  w = np.asarray(attnjax.attention_weights(q, jnp.asarray(kb, q.dtype), **kw))
  assert w.dtype == np.float32 and np.all(np.isfinite(w))
  atol = 2e-6 if c["dtype"] == "float32" else 2e-2
  np.testing.assert_allclose(w, ref["probs"], atol=atol)
  allowed = allowed_np(c["t"], c["s"], batch=c["b"], heads=c["n"],
                       mask=c["mask"], is_causal=c["causal"],
                       window=c["window"], q_lengths=c["ql"],
                       kv_lengths=c["kl"])
  assert np.all(w[~allowed] == 0.0)
  rows = allowed.any(-1)
  np.testing.assert_allclose(w.sum(-1)[rows], 1.0, atol=1e-5)


_BAD_ARGS = [
    ("scale", float("nan")), ("scale", float("-inf")),
    ("local_window_size", (2.5, 1)), ("local_window_size", -1),
    ("local_window_size", (1, 2, 3)), ("local_window_size", 1.0),
    ("dropout_rate", 1.0), ("dropout_rate", -0.1),
    ("key_value_seq_lengths", "lengths"), ("query_seq_lengths", [1.5]),
    ("mask", "float_mask"), ("bias", "int_bias"), ("implementation", "nope"),
]


@_n(_PROFILE.max_examples + 4)
@hypothesis.given(bad=st.sampled_from(_BAD_ARGS),
                  impl=st.sampled_from(["xla", "chunked"]),
                  t=st.integers(1, 6), s=st.integers(1, 6))
def test_bad_arguments_raise_naming_them(bad, impl, t, s):
  name, value = bad
  q = jnp.ones((2, t, 2, 4))
  kv = jnp.ones((2, s, 1, 4))
  kw = {"implementation": impl}
  if value == "lengths":
    value = jnp.ones((3,), jnp.int32)
  elif value == "float_mask":
    value = jnp.ones((t, s), jnp.float32)
  elif value == "int_bias":
    value = jnp.ones((t, s), jnp.int32)
  kw[name] = value
  with pytest.raises((ValueError, TypeError)) as e:
    attnjax.dot_product_attention(q, kv, kv, **kw)
  assert name in str(e.value), (name, str(e.value))


@_n(_PROFILE.max_examples + 4)
@hypothesis.given(
    num_heads=st.one_of(st.integers(-2, 4), st.just(2.0)),
    head_dim=st.one_of(st.none(), st.integers(-1, 4), st.just(4.5)),
    dropout_rate=st.sampled_from([0.0, 0.5, 1.0, -0.5, float("nan")]),
    width=st.sampled_from([4, 8]), seed=st.integers(0, 100))
def test_multi_head_attention_properties(num_heads, head_dim, dropout_rate,
                                         width, seed):
  kw = dict(head_dim=head_dim, dropout_rate=dropout_rate)
  problems = []
  if not isinstance(num_heads, int):
    problems.append("num_heads")
  elif num_heads < 1:
    problems.append("num_heads")
  if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
    problems.append("head_dim")
  if not 0.0 <= dropout_rate < 1.0:
    problems.append("dropout_rate")
  if (not problems and head_dim is None and width % num_heads):
    problems.append("qkv_features")
  if problems:
    with pytest.raises((ValueError, TypeError)) as e:
      attnjax.MultiHeadAttention(num_heads, width, rngs=nnx.Rngs(0), **kw)
    assert any(p in str(e.value) for p in problems), (problems, str(e.value))
    return
  layer = attnjax.MultiHeadAttention(num_heads, width, deterministic=True,
                                     rngs=nnx.Rngs(0), **kw)
  rng = np.random.default_rng(seed)
  xq = jnp.asarray(rng.standard_normal((2, 3, width)), jnp.float32)
  xkv = np.asarray(rng.standard_normal((2, 5, width)), np.float32)
  kl = np.array([2, 5])
  attn_kw = dict(key_value_seq_lengths=jnp.asarray(kl), implementation="xla")
  y = layer(xq, jnp.asarray(xkv), attention_kwargs=attn_kw)
  bad = xkv.copy()
  bad[0, 2:] = np.nan
  y_bad = layer(xq, jnp.asarray(bad), attention_kwargs=attn_kw)
  assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_allclose(y_bad, y, atol=1e-6)
  # Against the float64 reference through the layer's own projections.
  q, k, v = layer.project_qkv(xq, jnp.asarray(xkv))
  ref = attention_np(q, k, v, kv_lengths=kl)["out"]
  ref_y = np.einsum("btnh,nho->bto", ref,
                    np.asarray(layer.out.kernel[...], np.float64))
  ref_y = ref_y + np.asarray(layer.out.bias[...], np.float64)
  np.testing.assert_allclose(y, ref_y, atol=1e-4)
