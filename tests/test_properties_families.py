"""Property-based tests of the sequence and spatial families (issue 15).

Hypothesis draws shapes, key-padding masks, causal flags, NaN/Inf placements
in masked slots and bad arguments, and checks: agreement with a float64
NumPy softmax (or the plain-jnp reference where the selection rule is the
mechanism's own), masked-slot invariance, no NaN where the reference has
none, and a ValueError naming the argument for invalid input. Example counts
are bounded (`deadline=None`) so the suite stays small in CI.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnjax import sequence as sq
from attnjax import spatial as sp

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


def _softmax64(q, k, v, allow, scale):
  """float64 masked softmax attention; rows with nothing allowed -> 0.
  q [B,T,N,H], k/v [B,S,N,H], allow bool [B,N,T,S]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("btnh,bsnh->bnts", q, k) * scale
  logits = np.where(allow, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.where(allow, np.exp(logits - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = p / np.where(den > 0, den, 1.0)
  return np.einsum("bnts,bsnh->btnh", p, v)


@st.composite
def seq_case(draw):
  b = draw(st.integers(1, 2))
  t = draw(st.integers(1, 9))
  s = draw(st.sampled_from([t, draw(st.integers(1, 9))]))
  n = draw(st.sampled_from([1, 2]))
  h = draw(st.sampled_from([2, 4]))
  lengths = [draw(st.integers(0, s)) for _ in range(b)]
  causal = draw(st.booleans())
  poison = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30]))
  seed = draw(st.integers(0, 2 ** 16))
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, n, h)).astype(np.float32)
  k = rng.normal(size=(b, s, n, h)).astype(np.float32)
  v = rng.normal(size=(b, s, n, h)).astype(np.float32)
  keep = np.arange(s)[None, :] < np.asarray(lengths)[:, None]
  return q, k, v, keep, causal, poison


def _poisoned(x, keep, value):
  return np.where(keep[:, :, None, None], x, np.float32(value))


def _allow(keep, t, s, n, causal, extra=None):
  allow = np.broadcast_to(keep[:, None, None, :], (keep.shape[0], n, t, s))
  if causal:
    allow = allow & (np.arange(s)[None, :] <= np.arange(t)[:, None])
  if extra is not None:
    allow = allow & extra
  return allow


@SETTINGS
@given(seq_case(), st.integers(0, 3), st.integers(0, 3),
       st.sampled_from([1, 2, 4]))
def test_sliding_window_matches_float64_and_ignores_masked_slots(
    case, left, right, block):
  q, k, v, keep, causal, poison = case
  b, t, n, h = q.shape
  s = k.shape[1]
  mask = jnp.asarray(keep)[:, None, None, :]
  out = sq.sliding_window_attention(
      q, _poisoned(k, keep, poison), _poisoned(v, keep, poison), (left, right),
      is_causal=causal, block_size=block, mask=mask)
  rel = np.arange(s)[None, :] - np.arange(t)[:, None]
  band = (rel >= -left) & (rel <= (0 if causal else right))
  want = _softmax64(q, k, v, _allow(keep, t, s, n, causal, band), h ** -0.5)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)


@SETTINGS
@given(seq_case(), st.sampled_from([1, 2, 3]), st.data())
def test_block_sparse_matches_float64_and_ignores_masked_slots(case, bs, data):
  q, k, v, keep, causal, poison = case
  b, t, n, h = q.shape
  s = k.shape[1]
  nqb, nkb = -(-t // bs), -(-s // bs)
  layout = np.asarray(data.draw(st.lists(st.booleans(), min_size=nqb * nkb,
                                         max_size=nqb * nkb))).reshape(nqb,
                                                                       nkb)
  mask = jnp.asarray(keep)[:, None, None, :]
  out = sq.block_sparse_attention(
      q, _poisoned(k, keep, poison), _poisoned(v, keep, poison), layout, bs,
      is_causal=causal, mask=mask)
  dense = np.repeat(np.repeat(layout, bs, 0), bs, 1)[:t, :s]
  want = _softmax64(q, k, v, _allow(keep, t, s, n, causal, dense), h ** -0.5)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
  if layout.sum(-1).max() > 1:
    with pytest.raises(ValueError, match="max_blocks_per_row"):
      sq.block_sparse_attention(q, k, v, layout, bs,
                                max_blocks_per_row=int(layout.sum(-1).max()) - 1)


_SELECTING = {
    "moba": (lambda **kw: sq.moba_attention(block_size=2, top_k=2, **kw),
             lambda **kw: sq.moba_attention_reference(block_size=2, top_k=2,
                                                      **kw)),
    "routing": (lambda **kw: sq.routing_attention(region_size=2, top_k=2,
                                                  **kw),
                lambda **kw: sq.routing_attention_reference(
                    region_size=2, top_k=2, **kw)),
    "linear": (lambda **kw: sq.linear_attention(chunk_size=2, **kw),
               sq.linear_attention_reference),
    "performer": None,    # projection depends on head_dim (below)
}
_PROJ = {h: sq.orthogonal_random_features(jax.random.key(h), 8, h)
         for h in (2, 4)}


@SETTINGS
@given(seq_case(), st.sampled_from(sorted(_SELECTING)))
def test_selecting_mechanisms_match_reference_and_ignore_masked_slots(case,
                                                                      name):
  q, k, v, keep, causal, poison = case
  if name == "performer":
    proj = _PROJ[q.shape[-1]]
    fn = lambda **kw: sq.performer_attention(projection=proj, chunk_size=2,
                                             **kw)
    ref = lambda **kw: sq.performer_attention_reference(projection=proj, **kw)
  else:
    fn, ref = _SELECTING[name]
  mask = jnp.asarray(keep)[:, None, None, :]
  out = fn(query=q, key=_poisoned(k, keep, poison),
           value=_poisoned(v, keep, poison), is_causal=causal, mask=mask)
  want = ref(query=q, key=k, value=v, is_causal=causal, mask=mask)
  assert np.all(np.isfinite(np.asarray(want)))
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-4,
                             atol=1e-4)


@SETTINGS
@given(st.sampled_from([0, -1, 2.5, True, "3", None]),
       st.sampled_from(["moba_attention.block_size", "moba_attention.top_k",
                        "routing_attention.region_size",
                        "agent_attention.num_agents",
                        "block_sparse_attention.block_size",
                        "sliding_window_attention.block_size",
                        "linear_attention.chunk_size"]))
def test_bad_integer_arguments_name_the_argument(bad, target):
  fname, arg = target.split(".")
  q = jnp.ones((1, 4, 1, 2))
  extra = {"block_sparse_attention": dict(layout=np.ones((2, 2), bool),
                                          block_size=2),
           "sliding_window_attention": dict(window_size=1)}.get(fname, {})
  extra = dict(extra)
  extra[arg] = bad
  if bad is None and arg in ("chunk_size", "block_size") and fname in (
      "linear_attention", "sliding_window_attention"):
    return  # None means "default" there
  with pytest.raises((ValueError, TypeError), match=arg):
    getattr(sq, fname)(q, q, q, **extra)


# ------------------------------------------------------------------ spatial

@st.composite
def image_case(draw):
  h = draw(st.integers(3, 6))
  w = draw(st.integers(3, 6))
  n = draw(st.sampled_from([1, 2]))
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
  q, k, v = (rng.normal(size=(1, h, w, n, 4)).astype(np.float32)
             for _ in range(3))
  return q, k, v


@SETTINGS
@given(image_case(), st.integers(1, 3), st.integers(1, 2), st.booleans())
def test_neighborhood_matches_float64(case, kernel, dilation, causal):
  q, k, v = case
  _, h, w, n, d = q.shape
  if kernel * dilation > min(h, w):
    with pytest.raises(ValueError, match="kernel_size"):
      sp.neighborhood_attention(q, k, v, kernel, dilation=dilation)
    return
  out = sp.neighborhood_attention(q, k, v, kernel, dilation=dilation,
                                  is_causal=causal)
  mask = np.asarray(sp.neighborhood_mask((h, w), kernel, dilation, causal))
  flat = lambda x: x.reshape(1, h * w, n, d)
  want = _softmax64(flat(q), flat(k), flat(v),
                    np.broadcast_to(mask, (1, n, h * w, h * w)), d ** -0.5)
  np.testing.assert_allclose(np.asarray(out).reshape(want.shape), want,
                             rtol=2e-5, atol=2e-5)


@SETTINGS
@given(image_case(), st.integers(1, 4), st.integers(0, 2))
def test_window_matches_reference(case, window, shift):
  q, k, v = case
  shift = min(shift, window - 1)
  out = sp.window_attention(q, k, v, window, shift_size=shift)
  want = sp.window_attention_reference(q, k, v, window, shift_size=shift)
  assert np.all(np.isfinite(np.asarray(out)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5,
                             atol=2e-5)


@SETTINGS
@given(st.sampled_from([(3.7, 3.7), (2.5, 2), 0, -1, (1, 2, 3), "3", 3.0]),
       st.sampled_from(["neighborhood_attention.kernel_size",
                        "window_attention.window_size",
                        "grid_attention.grid_size",
                        "pooled_attention.pool_size"]))
def test_spatial_bad_sizes_name_the_argument(bad, target):
  fname, arg = target.split(".")
  q = jnp.ones((1, 4, 4, 1, 2))
  with pytest.raises(ValueError, match=arg):
    getattr(sp, fname)(q, q, q, bad)
