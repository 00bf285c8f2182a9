"""Neighborhood attention features of issue 17: stride (GNA), additional
key/value tokens merged through the log-sum-exp, `return_lse`, the relative
position bias kept, and the `implementation=` dispatch.

The oracle is a float64 NumPy implementation written from NATTEN's
definitions (the per-element mask of its flex backend: stride-group leader,
window centre clamped into the group, causal windows ending at the query),
independent of `pallas_kernels._rules.na_window`. Gradients are checked as
directional derivatives of that float64 oracle (central differences).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax.spatial.neighborhood import (NeighborhoodAttention,
                                          NeighborhoodPallas, NeighborhoodXLA,
                                          neighborhood_attention,
                                          neighborhood_mask,
                                          neighborhood_window_start)
from pallas_kernels._rules import na_query_reach, na_window


# ----------------------------------------------------------------------------
# float64 oracle from NATTEN's definitions
# ----------------------------------------------------------------------------

def _natten_axis(length, k, s, d, causal):
  """bool [L, L] mask and int [L, L] rpb offset index, element by element."""
  mask = np.zeros((length, length), bool)
  for qi, kj in itertools.product(range(length), repeat=2):
    if qi % d != kj % d:
      continue
    n = len(range(qi % d, length, d))
    q, kk = qi // d, kj // d
    if causal:
      leader = min((q // s) * s + s - 1, n - 1)
      ok = q - kk >= 0 and leader - kk < k
    else:
      leader = min((q // s) * s + s // 2, n - 1)
      left, right = k // 2, k // 2 + (k % 2 - 1)
      centre = min(max(leader, left), n - 1 - right)
      ok = (0 <= centre - kk <= left) or (0 <= kk - centre <= right)
    mask[qi, kj] = ok
  i = np.arange(length)
  rel = (i[None, :] // d) - (i[:, None] // d) + k - 1
  return mask, rel


def _natten_mask_and_rel(spatial, ks, st, dl, ca):
  nd = len(spatial)
  axes = [_natten_axis(*a) for a in zip(spatial, ks, st, dl, ca)]
  mask = np.ones((1, 1), bool)
  for (m, _), l in zip(axes, spatial):
    mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(
        mask.shape[0] * l, mask.shape[1] * l)
  rels = []
  for a, (_, r) in enumerate(axes):
    shape = [1] * (2 * nd)
    shape[a], shape[nd + a] = r.shape
    rels.append(np.broadcast_to(r.reshape(shape), tuple(spatial) * 2))
  return mask, rels


def oracle(q, k, v, ks, st=1, dl=1, ca=False, scale=None, rpb=None,
           ak=None, av=None):
  """(out, lse) in float64: out [B, *sp, N, Hv], lse [B, *sp, N]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  nd = q.ndim - 3
  spatial = q.shape[1:1 + nd]
  tup = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * nd
  ks, st, dl, ca = tup(ks), tup(st), tup(dl), tup(ca)
  b, n, h = q.shape[0], q.shape[-2], q.shape[-1]
  scale = h ** -0.5 if scale is None else scale
  size = int(np.prod(spatial))
  g = n // k.shape[-2]
  qf = q.reshape(b, size, n, h)
  kf = np.repeat(k.reshape(b, size, -1, h), g, axis=2)
  vf = np.repeat(v.reshape(b, size, -1, v.shape[-1]), g, axis=2)
  mask, rels = _natten_mask_and_rel(spatial, ks, st, dl, ca)
  logits = np.einsum("btnh,bsnh->bnts", qf, kf) * scale
  if rpb is not None:
    rpb = np.asarray(rpb, np.float64)
    inside = np.all([(r >= 0) & (r <= 2 * kk - 2) for r, kk in zip(rels, ks)],
                    axis=0).reshape(size, size)
    assert inside[mask].all(), "offset outside the rpb table"
    clipped = [np.clip(r, 0, 2 * kk - 2) for r, kk in zip(rels, ks)]
    logits = logits + rpb[(slice(None),) + tuple(clipped)].reshape(
        n, size, size)[None]
  if ak is not None:
    akf = np.repeat(np.asarray(ak, np.float64), g, axis=2)
    avf = np.repeat(np.asarray(av, np.float64), g, axis=2)
    logits = np.concatenate(
        [logits, np.einsum("btnh,bmnh->bntm", qf, akf) * scale], axis=-1)
    mask = np.concatenate([mask, np.ones((size, ak.shape[1]), bool)], 1)
    vf = np.concatenate([vf, avf], axis=1)
  logits = np.where(mask, logits, -np.inf)
  m = logits.max(-1, keepdims=True)
  p = np.exp(logits - m)
  lse = (m + np.log(p.sum(-1, keepdims=True)))[..., 0]
  out = np.einsum("bnts,bsnh->btnh", p / p.sum(-1, keepdims=True), vf)
  return (out.reshape(q.shape[:-1] + (v.shape[-1],)),
          np.moveaxis(lse, 1, -1).reshape(b, *spatial, n))


def _rand(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ----------------------------------------------------------------------------
# The window rule
# ----------------------------------------------------------------------------

def test_rule_matches_natten_exhaustively():
  """neighborhood_mask (built on _rules.na_window) == NATTEN's per-element
  definition for every L <= 9, K * d <= L, s <= K, causal or not; the
  backward kernels' query reach holds; offsets stay inside the rpb table."""
  for length in range(1, 10):
    for k in range(1, length + 1):
      for d in range(1, length // k + 1):
        for s, c in itertools.product(range(1, k + 1), (False, True)):
          want, rel = _natten_axis(length, k, s, d, c)
          got = neighborhood_mask((length,), k, d, c, stride=s)
          np.testing.assert_array_equal(got, want, err_msg=str((length, k, s,
                                                                d, c)))
          assert ((rel[want] >= 0) & (rel[want] <= 2 * k - 2)).all()
          before, after = na_query_reach(k, c)
          qi, kj = np.nonzero(want)
          assert ((qi // d >= kj // d - before)
                  & (qi // d <= kj // d + after)).all()
          start = neighborhood_window_start(length, k, d, c, stride=s)
          assert all(want[i, start[i]] and not want[i, :start[i]].any()
                     for i in range(length))


def test_stride_examples_by_hand():
  # L=8, K=4, s=4: two blocks {0..3}, {4..7}: blocked (Swin) attention.
  m = neighborhood_mask((8,), 4, stride=4)
  blocks = np.kron(np.eye(2, dtype=bool), np.ones((4, 4), bool))
  np.testing.assert_array_equal(m, blocks)
  # L=7, K=3, s=2: leaders 1, 3, 5, 6 (the last block {6} is cut at the
  # border); windows 0-2, 2-4, 4-6, 4-6.
  first, last = na_window(np.arange(7), 7, 3, 2)
  assert first.tolist() == [0, 0, 2, 2, 4, 4, 4]
  assert (last - first).tolist() == [2] * 7
  # Causal, L=6, K=3, s=2: leaders 1, 3, 5; query 2 sees keys 1..2.
  first, last = na_window(np.arange(6), 6, 3, 2, True)
  assert first.tolist() == [0, 0, 1, 1, 3, 3]
  assert last.tolist() == list(range(6))


# ----------------------------------------------------------------------------
# Values and gradients ('xla' backend) vs the float64 oracle
# ----------------------------------------------------------------------------

CASES = [
    # spatial, kernel, stride, dilation, causal, rpb, extra tokens, tile
    ((13,), 5, 3, 2, False, True, 3, None),
    ((9, 10), (3, 4), (2, 3), (2, 1), (True, False), True, 0, (2, 3)),
    ((7, 8), (4, 3), (4, 1), 1, False, False, 4, 3),
    ((4, 5, 6), (3, 2, 3), (1, 2, 3), (1, 2, 1), (False, True, False), True,
     2, None),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_values_lse_and_grads_vs_float64(case):
  spatial, ks, st, dl, ca, use_rpb, m, tile = CASES[case]
  nd = len(spatial)
  q = _rand(0, (2,) + spatial + (4, 8))
  k = _rand(1, (2,) + spatial + (2, 8))
  v = _rand(2, (2,) + spatial + (2, 6))
  kt = (ks,) * nd if isinstance(ks, int) else ks
  rpb = _rand(3, (4,) + tuple(2 * x - 1 for x in kt)) if use_rpb else None
  ak = _rand(4, (2, m, 2, 8)) if m else None
  av = _rand(5, (2, m, 2, 6)) if m else None
  kw = dict(stride=st, dilation=dl, is_causal=ca, scale=0.4)
  impl = NeighborhoodXLA(tile)

  def fn(q, k, v, rpb, ak, av):
    return neighborhood_attention(q, k, v, ks, rpb=rpb, additional_keys=ak,
                                  additional_values=av, return_lse=True,
                                  implementation=impl, **kw)

  out, lse = jax.jit(fn)(q, k, v, rpb, ak, av)
  want_out, want_lse = oracle(q, k, v, ks, st, dl, ca, 0.4, rpb, ak, av)
  assert out.dtype == jnp.float32 and lse.shape == q.shape[:-1]
  np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)

  # Directional derivative of sum(out * co) + sum(lse * cl) along a random
  # direction of every input, vs central differences of the float64 oracle.
  co, cl = _rand(6, out.shape), _rand(7, lse.shape)
  args = [q, k, v, rpb, ak, av]
  live = [i for i, a in enumerate(args) if a is not None]

  def loss(*xs):
    full = list(args)
    for i, x in zip(live, xs):
      full[i] = x
    o, l = fn(*full)
    return jnp.sum(o * co) + jnp.sum(l * cl)

  grads = jax.jit(jax.grad(loss, tuple(range(len(live)))))(
      *[args[i] for i in live])
  dirs = [_rand(10 + i, args[i].shape) for i in live]
  got = sum(float(jnp.vdot(g, d)) for g, d in zip(grads, dirs))

  def f64(t):
    full = [None if a is None else np.asarray(a, np.float64) for a in args]
    for i, d in zip(live, dirs):
      full[i] = full[i] + t * np.asarray(d, np.float64)
    o, l = oracle(full[0], full[1], full[2], ks, st, dl, ca, 0.4, full[3],
                  full[4], full[5])
    return (o * np.asarray(co, np.float64)).sum() + (
        l * np.asarray(cl, np.float64)).sum()

  eps = 1e-5
  want = (f64(eps) - f64(-eps)) / (2 * eps)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_values_and_vmap():
  spatial, ks, st = (9, 10), (3, 5), (3, 2)
  q = _rand(0, (2,) + spatial + (2, 8), jnp.bfloat16)
  k = _rand(1, (2,) + spatial + (2, 8), jnp.bfloat16)
  v = _rand(2, (2,) + spatial + (2, 8), jnp.bfloat16)
  ak, av = (_rand(3, (2, 3, 2, 8), jnp.bfloat16),
            _rand(4, (2, 3, 2, 8), jnp.bfloat16))
  fn = lambda q, k, v, ak, av: neighborhood_attention(
      q, k, v, ks, stride=st, additional_keys=ak, additional_values=av,
      return_lse=True)
  out, lse = jax.vmap(fn)(*(x[:, None] for x in (q, k, v, ak, av)))
  out, lse = out[:, 0], lse[:, 0]
  want_out, want_lse = oracle(q, k, v, ks, st, ak=ak, av=av)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float32), want_out,
                             atol=3e-2, rtol=3e-2)
  np.testing.assert_allclose(lse, want_lse, atol=3e-2, rtol=3e-2)
  # bfloat16 gradients (through the lse merge) vs float32 ones.
  loss = lambda q, k, v, ak, av: (lambda o, l: jnp.sum(
      o.astype(jnp.float32)) + jnp.sum(l))(*fn(q, k, v, ak, av))
  f32 = lambda x: x.astype(jnp.float32)
  g = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))(q, k, v, ak, av)
  gr = jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))(*map(f32, (q, k, v, ak, av)))
  for a, b in zip(g, gr):
    assert a.dtype == jnp.bfloat16
    err = np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b)
    assert err < 3e-2, err


def test_no_additional_tokens_is_plain_and_empty_set_gives_no_nan():
  q, k, v = (_rand(i, (1, 7, 8, 2, 4)) for i in range(3))
  plain, plain_lse = neighborhood_attention(q, k, v, 3, return_lse=True)
  want_out, want_lse = oracle(q, k, v, 3)
  np.testing.assert_allclose(plain, want_out, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(plain_lse, want_lse, atol=2e-5, rtol=2e-5)
  # Zero additional tokens: an empty softmax part (lse -inf) merges to
  # exactly the neighbourhood attention, with finite gradients.
  empty = jnp.zeros((1, 0, 2, 4))
  fn = lambda q: neighborhood_attention(q, k, v, 3, additional_keys=empty,
                                        additional_values=empty,
                                        return_lse=True)
  out, lse = fn(q)
  np.testing.assert_allclose(out, plain, atol=1e-6)
  np.testing.assert_allclose(lse, plain_lse, atol=1e-6)
  g = jax.jit(jax.grad(lambda q: jnp.sum(fn(q)[0]) + jnp.sum(fn(q)[1])))(q)
  assert np.isfinite(np.asarray(g)).all()


def test_dispatch_configs_and_refusals():
  q, k, v = (_rand(i, (1, 6, 7, 2, 4)) for i in range(3))
  rpb = _rand(3, (2, 5, 5))
  ref = oracle(q, k, v, 3, rpb=rpb)[0]
  for impl in (None, "auto", "xla", NeighborhoodXLA((2, 5)),
               ["pallas", "xla"], [NeighborhoodPallas(), "xla"]):
    # 'pallas' refuses `rpb`; a sequence falls through to 'xla'.
    out = neighborhood_attention(q, k, v, 3, rpb=rpb, implementation=impl)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  with pytest.raises(NotImplementedError, match="rpb"):
    neighborhood_attention(q, k, v, 3, rpb=rpb, implementation="pallas")
  with pytest.raises(ValueError, match="implementation"):
    neighborhood_attention(q, k, v, 3, implementation="cuda")


def test_value_errors_name_the_argument():
  q = _rand(0, (1, 6, 7, 2, 4))
  with pytest.raises(ValueError, match="stride.*axis 1: stride=4"):
    neighborhood_attention(q, q, q, 3, stride=(1, 4))
  with pytest.raises(ValueError, match="stride"):
    neighborhood_attention(q, q, q, 3, stride=0)
  with pytest.raises(ValueError, match="additional_keys.*together"):
    neighborhood_attention(q, q, q, 3, additional_keys=q[:, 0])
  with pytest.raises(ValueError, match=r"additional_keys.*\(1, 7, 2, 5\)"):
    neighborhood_attention(q, q, q, 3, additional_keys=jnp.zeros((1, 7, 2, 5)),
                           additional_values=jnp.zeros((1, 7, 2, 4)))
  with pytest.raises(ValueError, match="stride"):
    NeighborhoodAttention(8, 2, 3, stride=4, rngs=nnx.Rngs(0))


def test_layer_stride_and_context():
  dim, heads = 8, 2
  layer = NeighborhoodAttention(dim, heads, (3, 4), stride=(2, 3),
                                rngs=nnx.Rngs(0))
  layer.rpb[...] = _rand(1, layer.rpb.shape)
  x, ctx = _rand(2, (2, 6, 7, dim)), _rand(3, (2, 3, dim))
  y = layer(x, context=ctx)
  qkv = layer.qkv(x).reshape(2, 6, 7, 3, heads, 4)
  ckv = layer.qkv(ctx).reshape(2, 3, 3, heads, 4)
  o, _ = oracle(qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :],
                (3, 4), (2, 3), rpb=layer.rpb[...], ak=ckv[..., 1, :, :],
                av=ckv[..., 2, :, :], scale=layer.scale)
  np.testing.assert_allclose(
      y, layer.proj(jnp.asarray(o, jnp.float32).reshape(2, 6, 7, dim)),
      atol=2e-5, rtol=2e-5)
  # Small input: kernel reduced to the size, stride capped at it.
  assert layer.window_for((2, 7))[:3] == ((2, 4), (2, 3), (1, 1))
  assert layer(x[:, :2]).shape == (2, 2, 7, dim)
  with pytest.raises(ValueError, match="context"):
    layer(x, context=ctx[..., :4])
