"""attnjax.positions: RoPE (1D, 2D axial, partial, both conventions) and
ALiBi against float64 NumPy references written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attnjax import positions as P


def rope_np(x, pos, base=10000.0, fraction=1.0, convention="half"):
  """x [B, T, N, H] float64; pos [B, T] or [B, T, A]. Pair by pair: the
  pair (a, b) of axis group g turns by the angle pos_g * base^(-2i / (R/A))."""
  x = np.asarray(x, np.float64)
  pos = np.asarray(pos, np.float64)
  if pos.ndim == x.ndim - 2:
    pos = pos[..., None]
  b, t, n, h = x.shape
  naxes = pos.shape[-1]
  r = int(np.floor(fraction * h + 1e-9)) // (2 * naxes) * (2 * naxes)
  per = r // naxes
  out = x.copy()
  for g in range(naxes):
    for i in range(per // 2):
      theta = base ** (-2.0 * i / per)
      if convention == "half":
        ia, ib = g * per + i, g * per + i + per // 2
      else:
        ia, ib = g * per + 2 * i, g * per + 2 * i + 1
      ang = pos[:, :, g] * theta                     # [B, T]
      c, s = np.cos(ang)[..., None], np.sin(ang)[..., None]
      a, bb = x[..., ia], x[..., ib]
      out[..., ia] = a * c - bb * s
      out[..., ib] = a * s + bb * c
  return out


def _x(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


@pytest.mark.parametrize("convention", ["half", "interleaved"])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.3])
def test_rope_matches_formula(convention, fraction):
  x = _x((2, 5, 3, 12))
  pos = jnp.array([[0, 1, 2, 3, 4], [7, 3, 100, 2000, 5]])
  got = P.apply_rope(x, pos, fraction=fraction, convention=convention)
  ref = rope_np(x, pos, fraction=fraction, convention=convention)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)
  # passed-through channels are untouched
  r = P.rotary_dims(12, fraction)
  np.testing.assert_array_equal(np.asarray(got[..., r:]), np.asarray(x[..., r:]))
  # default positions are arange(T); offset shifts them
  np.testing.assert_allclose(
      np.asarray(P.apply_rope(x, convention=convention, fraction=fraction,
                              offset=3)),
      rope_np(x, np.broadcast_to(np.arange(3, 8), (2, 5)), fraction=fraction,
              convention=convention), atol=2e-5, rtol=2e-5)


def test_conventions_differ_and_are_a_channel_permutation():
  x = _x((1, 4, 2, 8))
  half = P.apply_rope(x, convention="half")
  inter = P.apply_rope(x, convention="interleaved")
  assert float(jnp.max(jnp.abs(half - inter))) > 1e-2
  # interleaved on x == half on the de-interleaved x, re-interleaved
  perm = np.array([0, 2, 4, 6, 1, 3, 5, 7])      # (2i, 2i+1) -> (i, i+4)
  inv = np.argsort(perm)
  np.testing.assert_allclose(
      np.asarray(P.apply_rope(x[..., perm], convention="half")[..., inv]),
      np.asarray(inter), atol=1e-6)


def test_half_convention_matches_flax_rope():
  """Another project's output: flax.nnx.RoPE (rotate-half) on [..., T, H]."""
  x = _x((2, 6, 3, 16), seed=3)
  rope = nnx.RoPE(embedding_size=16, max_seq_len=6)
  ref = jax.vmap(rope, in_axes=-2, out_axes=-2)(x)
  np.testing.assert_allclose(np.asarray(P.apply_rope(x)), np.asarray(ref),
                             atol=1e-5)


@pytest.mark.parametrize("convention", ["half", "interleaved"])
@pytest.mark.parametrize("axes", [1, 2])
def test_rope_relative_property(convention, axes):
  """q_m . k_n depends on the positions only through m - n."""
  q, k = _x((1, 1, 1, 16), 1), _x((1, 1, 1, 16), 2)
  rng = np.random.default_rng(0)

  def score(m, n):
    pm = jnp.asarray(m, jnp.float32).reshape(1, 1, -1)
    pn = jnp.asarray(n, jnp.float32).reshape(1, 1, -1)
    if axes == 1:
      pm, pn = pm[..., 0], pn[..., 0]
    qr = P.apply_rope(q, pm, convention=convention)
    kr = P.apply_rope(k, pn, convention=convention)
    return float(jnp.sum(qr * kr))

  for _ in range(5):
    m = rng.integers(0, 50, axes)
    n = rng.integers(0, 50, axes)
    shift = rng.integers(-20, 20, axes)
    np.testing.assert_allclose(score(m, n), score(m + shift, n + shift),
                               atol=1e-4)
  # and it is not position-independent
  assert abs(score([0] * axes, [0] * axes) - score([5] * axes, [0] * axes)) > 1e-3


def test_rope_2d_axial_matches_formula():
  x = _x((2, 3, 4, 2, 8), seed=4)
  got = P.apply_rope_2d(x, base=100.0, fraction=1.0)
  rows, cols = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
  pos = np.stack([rows.reshape(-1), cols.reshape(-1)], -1)
  ref = rope_np(np.asarray(x).reshape(2, 12, 2, 8),
                np.broadcast_to(pos, (2, 12, 2)), base=100.0)
  np.testing.assert_allclose(np.asarray(got).reshape(2, 12, 2, 8), ref,
                             atol=2e-5)
  # the first half of the channels only sees the row, the second the column
  v = jnp.broadcast_to(_x((1, 1, 1, 1, 8), seed=8), (1, 3, 4, 1, 8))
  y = np.asarray(P.apply_rope_2d(v))
  np.testing.assert_array_equal(y[:, 1, 0, :, :4], y[:, 1, 3, :, :4])
  np.testing.assert_array_equal(y[:, 0, 2, :, 4:], y[:, 2, 2, :, 4:])
  assert np.abs(y[:, 0, 2, :, :4] - y[:, 2, 2, :, :4]).max() > 1e-3


def test_rope_partial_2d_and_grid_positions():
  x = _x((1, 2, 2, 1, 12), seed=5)
  got = P.apply_rope_2d(x, fraction=0.7)      # R = 8: 4 per axis
  ref = rope_np(np.asarray(x).reshape(1, 4, 1, 12),
                np.asarray(P.grid_positions(2, 2))[None], base=100.0,
                fraction=0.7)
  np.testing.assert_allclose(np.asarray(got).reshape(1, 4, 1, 12), ref,
                             atol=2e-5)
  np.testing.assert_array_equal(np.asarray(P.grid_positions(2, 3)),
                                [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])


def test_rope_bf16_jit_vmap_grad():
  x = _x((2, 4, 2, 8), seed=6)
  pos = jnp.array([[0, 1, 2, 3], [4, 5, 6, 9]])
  ref = rope_np(x, pos)
  y16 = jax.jit(P.apply_rope)(x.astype(jnp.bfloat16), pos)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), ref, atol=5e-2)
  yv = jax.vmap(lambda a, p: P.apply_rope(a[None], p[None])[0])(x, pos)
  np.testing.assert_allclose(np.asarray(yv), ref, atol=2e-5)
  # rotation: the gradient of <rope(x), g> is the inverse rotation of g
  g = _x((2, 4, 2, 8), seed=7)
  dx = jax.grad(lambda a: jnp.sum(P.apply_rope(a, pos) * g))(x)
  np.testing.assert_allclose(np.asarray(dx), rope_np(g, -np.asarray(pos)),
                             atol=2e-5)


def test_rope_bad_input():
  with pytest.raises(ValueError, match="convention"):
    P.apply_rope(_x((1, 2, 1, 4)), convention="neox")
  with pytest.raises(ValueError, match="positions"):
    P.apply_rope(_x((1, 3, 1, 4)), jnp.arange(5))
  with pytest.raises(ValueError, match="fraction"):
    P.apply_rope(_x((1, 3, 1, 4)), fraction=0.2)
  with pytest.raises(ValueError, match="fraction"):
    P.Rotary(fraction=1.5)
  with pytest.raises(ValueError, match="dim"):
    P.rope_frequencies(5)
  with pytest.raises(ValueError, match=r"\[B, H, W, N, D\]"):
    P.apply_rope_2d(_x((1, 3, 1, 4)))


def alibi_slopes_np(n):
  """The paper's rule, written directly: geometric sequence starting at
  2^(-8/n) with ratio 2^(-8/n) for n a power of 2; otherwise the slopes of
  the closest lower power of 2 followed by the odd-indexed slopes of twice
  that many heads."""
  def geo(k):
    start = 2.0 ** (-8.0 / k)
    return [start * start ** i for i in range(k)]
  p = 1
  while 2 * p <= n:
    p *= 2
  return np.array(geo(p) + geo(2 * p)[0::2][:n - p])


@pytest.mark.parametrize("n", [1, 2, 3, 6, 8, 12, 16, 20])
def test_alibi_slopes(n):
  np.testing.assert_allclose(np.asarray(P.alibi_slopes(n)), alibi_slopes_np(n),
                             rtol=1e-6)


def test_alibi_slopes_paper_values():
  # 8 heads: 1/2, 1/4, ..., 1/256 (Press et al. 2022, Sec. 3)
  np.testing.assert_allclose(np.asarray(P.alibi_slopes(8)),
                             [2.0 ** -i for i in range(1, 9)], rtol=1e-7)
  # 16 heads: 1/sqrt(2), 1/2, ..., 1/256
  np.testing.assert_allclose(np.asarray(P.alibi_slopes(16)),
                             [2.0 ** (-i / 2) for i in range(1, 17)], rtol=1e-6)


@pytest.mark.parametrize("mode", ["causal", "symmetric"])
def test_alibi_bias_matches_formula(mode):
  n, qp, kp = 6, np.array([3, 4, 5]), np.arange(7)
  got = np.asarray(P.alibi_bias(n, qp, kp, mode=mode))
  ref = np.zeros((n, 3, 7))
  m = alibi_slopes_np(n)
  for h in range(n):
    for i in range(3):
      for j in range(7):
        d = qp[i] - kp[j]
        ref[h, i, j] = -m[h] * (abs(d) if mode == "symmetric" else d)
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  assert P.alibi_bias(n, 5, mode=mode).shape == (n, 5, 5)
  # batched positions give [B, N, T, S]
  bq = jnp.stack([jnp.arange(3), jnp.arange(3) + 4])
  assert P.alibi_bias(n, bq, jnp.stack([kp, kp]), mode=mode).shape == (2, n, 3, 7)
  with pytest.raises(ValueError, match="mode"):
    P.alibi_bias(n, 3, mode="left")
  with pytest.raises(ValueError, match="num_heads"):
    P.alibi_slopes(0)
